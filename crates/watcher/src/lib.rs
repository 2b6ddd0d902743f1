//! watcher service.
