//! The few runtime services the node needs: tokio natively, the browser's event loop in wasm.
//!
//! Panics in tasks: natively every task runs under `catch_unwind`, so a panic is logged with
//! `tracing::error!` and never ends a task silently. Short-lived tasks ([`spawn`]) just end.
//! Long-lived ones say what a panic does: [`spawn_restarting`] starts the task again over the
//! state it owns (its queue), [`spawn_supervised`] lets it end, dropping what it owns so that
//! everyone talking to it sees its channels close. In the browser (`panic = "abort"`) nothing
//! unwinds: a panic ends the whole module, and the panic hook of `crate::web` tells the page.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
pub use web_time::{Duration, Instant};

/// A future that is `Send` natively and need not be in the browser (like every task here).
pub type TaskFuture<'a> = crate::store::MaybeSendFuture<'a, ()>;

#[cfg(not(target_arch = "wasm32"))]
pub trait MaybeSend: Send {}
#[cfg(not(target_arch = "wasm32"))]
impl<T: Send> MaybeSend for T {}
#[cfg(target_arch = "wasm32")]
pub trait MaybeSend {}
#[cfg(target_arch = "wasm32")]
impl<T> MaybeSend for T {}

/// Runs a short-lived task (one answer, one push); a panic ends it and is logged.
pub fn spawn<F: Future<Output = ()> + MaybeSend + 'static>(f: F) {
    spawn_boxed(Box::pin(async move {
        if let Err(panic) = AssertUnwindSafe(f).catch_unwind().await {
            tracing::error!(panic = panic_message(&*panic), "task panicked");
        }
    }));
}

/// Runs a long-lived task that cannot be started again (it owns state a panic may have left
/// broken, like the swarm): a panic is logged and the task ends, dropping what it owns, so the
/// channels to it close and its users see it stopped instead of waiting on it.
pub fn spawn_supervised<F>(name: &'static str, task: F)
where
    F: Future<Output = ()> + MaybeSend + 'static,
{
    spawn_boxed(Box::pin(async move {
        if let Err(panic) = AssertUnwindSafe(task).catch_unwind().await {
            tracing::error!(
                task = name,
                panic = panic_message(&*panic),
                "task panicked; it has stopped"
            );
        }
    }));
}

/// After a panic a task waits this long before it runs again, doubling up to
/// [`MAX_RESTART_DELAY`] while it keeps panicking (so a task that panics at once cannot spin).
const MIN_RESTART_DELAY: Duration = Duration::from_millis(100);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);
/// A task that ran this long before it panicked starts again at once.
const CALM: Duration = Duration::from_secs(60);

/// Runs a long-lived task over `state` (typically the receiving end of its queue): a panic is
/// logged and the task starts again over the same state, so the queue and whatever is still in
/// it survive; what the panicking run held is dropped. A normal return ends it for good.
pub fn spawn_restarting<S, F>(name: &'static str, mut state: S, mut task: F)
where
    S: MaybeSend + 'static,
    F: for<'a> FnMut(&'a mut S) -> TaskFuture<'a> + MaybeSend + 'static,
{
    spawn_boxed(Box::pin(async move {
        let mut delay = Duration::ZERO;
        loop {
            let started = Instant::now();
            let Err(panic) = AssertUnwindSafe(task(&mut state)).catch_unwind().await else {
                return;
            };
            if started.elapsed() >= CALM {
                delay = Duration::ZERO;
            }
            tracing::error!(
                task = name,
                panic = panic_message(&*panic),
                restart_in_ms = delay.as_millis() as u64,
                "task panicked; restarting it"
            );
            sleep(delay).await;
            delay = (delay * 2).clamp(MIN_RESTART_DELAY, MAX_RESTART_DELAY);
        }
    }));
}

/// What a panic said (`panic!` payloads are `&str` or `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn spawn_boxed(f: TaskFuture<'static>) {
    tokio::spawn(f);
}

#[cfg(target_arch = "wasm32")]
fn spawn_boxed(f: TaskFuture<'static>) {
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

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;

    /// Everything logged on this thread while the guard lives (the tests' runtime has one).
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            (logs, tracing::subscriber::set_default(subscriber))
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    const PATIENCE: Duration = Duration::from_secs(10);

    /// An echo task over a queue that panics on "boom".
    fn echo<'a>(
        queue: &'a mut mpsc::Receiver<&'static str>,
        out: mpsc::UnboundedSender<&'static str>,
    ) -> TaskFuture<'a> {
        Box::pin(async move {
            while let Some(item) = queue.recv().await {
                assert_ne!(item, "boom", "a bad item");
                let _ = out.send(item);
            }
        })
    }

    #[tokio::test]
    async fn a_restarting_task_that_panics_is_logged_and_goes_on_over_the_same_queue() {
        let (logs, _guard) = Logs::capture();
        let (tx, queue) = mpsc::channel(8);
        let (out_tx, mut out) = mpsc::unbounded_channel();
        spawn_restarting("echo", queue, move |q| echo(q, out_tx.clone()));
        for item in ["a", "boom", "b", "boom", "c"] {
            tx.send(item).await.unwrap();
        }
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match timeout(PATIENCE, out.recv()).await {
                Some(Some(item)) => seen.push(item),
                other => panic!("echo stopped after {seen:?}: {other:?}"),
            }
        }
        assert_eq!(seen, ["a", "b", "c"]);
        let text = logs.text();
        assert_eq!(text.matches("task panicked").count(), 2, "{text}");
        assert!(text.contains("ERROR") && text.contains("echo") && text.contains("a bad item"));
        // Closing the queue ends the task for good: a normal return is not restarted.
        drop(tx);
        assert_eq!(timeout(PATIENCE, out.recv()).await, Some(None));
    }

    #[tokio::test]
    async fn a_supervised_task_that_panics_ends_drops_what_it_owns_and_says_so() {
        let (logs, _guard) = Logs::capture();
        let (commands, mut rx) = mpsc::unbounded_channel::<u32>();
        let (events, mut heard) = mpsc::unbounded_channel::<u32>();
        spawn_supervised("swarm", async move {
            while let Some(n) = rx.recv().await {
                assert!(n < 2, "swarm state broken");
                let _ = events.send(n);
            }
        });
        commands.send(1).unwrap();
        assert_eq!(timeout(PATIENCE, heard.recv()).await, Some(Some(1)));
        commands.send(2).unwrap();
        // Those who talk to it see it gone: its channels close rather than hang.
        assert_eq!(timeout(PATIENCE, heard.recv()).await, Some(None));
        assert!(timeout(PATIENCE, commands.closed()).await.is_some());
        let text = logs.text();
        assert!(
            text.contains("ERROR") && text.contains("swarm") && text.contains("swarm state broken"),
            "{text}"
        );
        assert!(text.contains("stopped"), "{text}");
    }

    #[tokio::test]
    async fn a_short_task_that_panics_is_logged() {
        let (logs, _guard) = Logs::capture();
        let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
        spawn(async move {
            let _done = done_tx;
            panic!("one answer failed");
        });
        assert!(timeout(PATIENCE, done).await.is_some());
        // One thread: the task's poll that panicked (and logged) ended before this one resumed.
        let text = logs.text();
        assert!(
            text.contains("ERROR") && text.contains("one answer failed"),
            "{text}"
        );
    }
}
