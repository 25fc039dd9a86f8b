//! Integration tests: transcoder.
