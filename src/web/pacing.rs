//! Keeps the worker's event loop turning during long runs.
//!
//! The CPU forward is synchronous: a whole generation would run without the worker ever
//! reading its messages, so Stop would arrive after the answer. Before a forward, if the
//! last yield is older than `EVERY_MS`, this wrapper gives the event loop one macrotask
//! (a zero timeout). Yielding on every token would cost the 4 ms minimum that browsers
//! put on nested timeouts, which is more than a small model's whole step.

use gloo_timers::future::TimeoutFuture;
use web_time::Instant;

use crate::backend::{Backend, BoxFuture, DeviceStats, Next, Want};
use crate::error::Result;
use crate::model::PhiConfig;

const EVERY_MS: u128 = 30;

pub struct Paced<B> {
    inner: B,
    last_yield: Instant,
}

impl<B: Backend> Paced<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            last_yield: Instant::now(),
        }
    }

    async fn pace(&mut self) {
        if self.last_yield.elapsed().as_millis() >= EVERY_MS {
            TimeoutFuture::new(0).await;
            self.last_yield = Instant::now();
        }
    }
}

impl<B: Backend> Backend for Paced<B> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn config(&self) -> &PhiConfig {
        self.inner.config()
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn cached(&self) -> usize {
        self.inner.cached()
    }
    fn truncate(&mut self, len: usize) {
        self.inner.truncate(len)
    }
    fn forward<'a>(&'a mut self, tokens: &'a [u32], want: Want) -> BoxFuture<'a, Result<Next>> {
        Box::pin(async move {
            self.pace().await;
            self.inner.forward(tokens, want).await
        })
    }
    fn last_row(&mut self) -> BoxFuture<'_, Result<Vec<f32>>> {
        self.inner.last_row()
    }
    fn device_stats(&self) -> Option<DeviceStats> {
        self.inner.device_stats()
    }
}
