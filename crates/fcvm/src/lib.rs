//! fcvm host library.
