//! The builder's plan (reference §5.2, §5.4, §5.5): which images to build,
//! which builds to upload where, and which builds and uploads to delete.
//! (Filled in with the builder runtime.)
