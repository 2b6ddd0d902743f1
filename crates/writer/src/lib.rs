//! writer service.
