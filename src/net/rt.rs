//! The few runtime services the node needs: tokio natively, the browser's event loop in wasm.

use std::future::Future;

pub use web_time::{Duration, Instant};

#[cfg(not(target_arch = "wasm32"))]
pub fn spawn<F: Future<Output = ()> + Send + 'static>(f: F) {
    tokio::spawn(f);
}

#[cfg(target_arch = "wasm32")]
pub fn spawn<F: Future<Output = ()> + 'static>(f: F) {
    wasm_bindgen_futures::spawn_local(f);
}

/// A periodic tick (the first one fires at once, like tokio's).
pub struct Interval {
    #[cfg(not(target_arch = "wasm32"))]
    inner: tokio::time::Interval,
    #[cfg(target_arch = "wasm32")]
    inner: gloo_timers::future::IntervalStream,
    #[cfg(target_arch = "wasm32")]
    first: bool,
}

impl Interval {
    pub fn new(period: Duration) -> Self {
        #[cfg(not(target_arch = "wasm32"))]
        return Self {
            inner: tokio::time::interval(period),
        };
        #[cfg(target_arch = "wasm32")]
        return Self {
            inner: gloo_timers::future::IntervalStream::new(
                period.as_millis().min(u32::MAX as u128) as u32,
            ),
            first: true,
        };
    }

    pub async fn tick(&mut self) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.inner.tick().await;
        }
        #[cfg(target_arch = "wasm32")]
        {
            if std::mem::take(&mut self.first) {
                return;
            }
            futures::StreamExt::next(&mut self.inner).await;
        }
    }
}

/// Waits for `d`.
pub async fn sleep(d: Duration) {
    timeout(d, std::future::pending::<()>()).await;
}

/// Runs `f` for at most `limit`; `None` if time ran out first.
pub async fn timeout<F: Future>(limit: Duration, f: F) -> Option<F::Output> {
    #[cfg(not(target_arch = "wasm32"))]
    return tokio::time::timeout(limit, f).await.ok();
    #[cfg(target_arch = "wasm32")]
    {
        let sleep = gloo_timers::future::sleep(limit);
        futures::pin_mut!(f);
        futures::pin_mut!(sleep);
        match futures::future::select(f, sleep).await {
            futures::future::Either::Left((out, _)) => Some(out),
            futures::future::Either::Right(_) => None,
        }
    }
}
