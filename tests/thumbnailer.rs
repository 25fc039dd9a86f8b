//! Integration tests: thumbnailer.
