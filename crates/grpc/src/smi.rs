//! Conversions between the hub model and its wire form.
