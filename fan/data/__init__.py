from .photos import BundledPhoto, bundled_photos
