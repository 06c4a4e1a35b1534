//! A flag that asks long work to stop at its next safe point: generation checks it before
//! every token and between prefill chunks, evaluation between items, training between
//! steps. Whoever holds a clone can raise it: a Ctrl-C handler in the CLI, the page's Stop
//! button through the worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the work to stop; it finishes the step it is in and keeps what it has.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Lowers the flag before the next piece of work.
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}
