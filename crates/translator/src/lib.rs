//! translator service.
