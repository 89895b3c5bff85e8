from .photos import PHOTO_DIR, BundledPhoto, bundled_photos
