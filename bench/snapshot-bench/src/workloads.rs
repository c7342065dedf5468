//! The operation sequences. Each returns its samples as a [`Batch`]; on error
//! the caller removes whatever the target's ledger still holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::Error;
use crate::client::{Target, read_rss_kib};
use crate::results::{Batch, Unit};

/// Which kinds of snapshot the `rss` workload keeps alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RssMix {
    /// One committed base plus active snapshots on it.
    Active,
    /// One committed base, then alternately active and committed snapshots.
    Mixed,
}

/// What the `rss` workload reports when no `pid` was given for a target.
pub const NO_PID: &str = "n/a (no --pid)";

/// Prepare/Commit a `layers`-deep chain, View the top, Remove all top-down.
/// Before each Remove of a layer, a Remove of a key that never existed
/// (`remove missing`): the service's round trip with no work behind it, the
/// floor under the Remove's latency, measured under the same conditions.
pub async fn chain(t: &Target, prefix: &str, layers: usize) -> Result<Batch, Error> {
    let mut out = Batch::default();
    let mut parent = String::new();
    let mut committed = Vec::with_capacity(layers);
    for i in 1..=layers {
        let key = format!("{prefix}-layer-{i}");
        let name = format!("{prefix}-committed-{i}");
        out.push_duration("prepare", t.prepare(&key, &parent).await?);
        out.push_duration("commit", t.commit(&name, &key).await?);
        committed.push(name.clone());
        parent = name;
    }
    let view = format!("{prefix}-view");
    out.push_duration("view", t.view(&view, &parent).await?);
    out.push_duration("remove", t.remove(&view).await?);
    for (i, name) in committed.iter().enumerate().rev() {
        let missing = format!("{prefix}-missing-{i}");
        out.push_duration("remove missing", t.remove_missing(&missing).await?);
        out.push_duration("remove", t.remove(name).await?);
    }
    Ok(out)
}

/// Builds an untimed committed chain of `layers` layers; returns the names,
/// bottom first.
async fn build_image(t: &Target, prefix: &str, layers: usize) -> Result<Vec<String>, Error> {
    let mut names = Vec::with_capacity(layers);
    let mut parent = String::new();
    for i in 1..=layers {
        let key = format!("{prefix}-image-layer-{i}");
        let name = format!("{prefix}-image-{i}");
        t.prepare(&key, &parent).await?;
        t.commit(&name, &key).await?;
        names.push(name.clone());
        parent = name;
    }
    Ok(names)
}

async fn remove_image(t: &Target, names: &[String]) -> Result<(), Error> {
    for name in names.iter().rev() {
        t.remove(name).await?;
    }
    Ok(())
}

/// Runs `op` on every key with at most `concurrency` in flight. Returns each
/// call's latency and the wall time from the first start to the last finish,
/// or the first error once every call has finished.
async fn fan_out<F, Fut>(t: &Target, keys: Vec<String>, concurrency: usize, op: F) -> Result<(Vec<Duration>, Duration), Error>
where
    F: Fn(Target, String) -> Fut,
    Fut: std::future::Future<Output = Result<Duration, Error>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let start = Instant::now();
    for key in keys {
        let sem = Arc::clone(&sem);
        let call = op(t.clone(), key);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|e| Error::Internal(e.to_string()))?;
            call.await
        });
    }
    let mut latencies = Vec::new();
    let mut first_err = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(d)) => latencies.push(d),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(Error::Internal(format!("task failed: {e}")));
            }
        }
    }
    let wall = start.elapsed();
    match first_err {
        Some(e) => Err(e),
        None => Ok((latencies, wall)),
    }
}

/// A 3-layer image, then `count` containers Prepared from its top with at
/// most `concurrency` in flight, then Removed the same way. Before the
/// Removes, as many Removes of keys that never existed, the same way
/// (`remove missing`): the floor under a burst of Removes.
pub async fn parallel(t: &Target, prefix: &str, count: usize, concurrency: usize) -> Result<Batch, Error> {
    let mut out = Batch::default();
    let image = build_image(t, prefix, 3).await?;
    let top = image.last().cloned().unwrap_or_default();
    let keys: Vec<String> = (1..=count).map(|i| format!("{prefix}-container-{i}")).collect();

    let parent = Arc::new(top);
    let burst = fan_out(t, keys.clone(), concurrency, move |t, key| {
        let parent = Arc::clone(&parent);
        async move { t.prepare(&key, &parent).await }
    })
    .await?;
    push_burst(&mut out, "prepare", count, burst);

    let missing: Vec<String> = keys.iter().map(|k| format!("{k}-missing")).collect();
    let burst = fan_out(t, missing, concurrency, |t, key| async move { t.remove_missing(&key).await }).await?;
    push_burst(&mut out, "remove missing", count, burst);

    let burst = fan_out(t, keys, concurrency, |t, key| async move { t.remove(&key).await }).await?;
    push_burst(&mut out, "remove", count, burst);

    remove_image(t, &image).await?;
    Ok(out)
}

/// Records a [`fan_out`] of `count` calls: each latency as `op`, and the
/// wall time as `<op> wall (<count> at once)`.
fn push_burst(out: &mut Batch, op: &str, count: usize, (latencies, wall): (Vec<Duration>, Duration)) {
    for d in latencies {
        out.push_duration(op, d);
    }
    out.push_duration(format!("{op} wall ({count} at once)"), wall);
}

fn rss_mib(pid: Option<u32>) -> Result<Option<f64>, Error> {
    match pid {
        Some(pid) => Ok(Some(read_rss_kib(pid)? as f64 / 1024.0)),
        None => Ok(None),
    }
}

/// Operation names of the `rss` workload's memory rows, in display order.
pub fn rss_ops(count: usize) -> [String; 4] {
    ["rss before".to_owned(), format!("rss with {count} snapshots"), "rss growth".to_owned(), "rss after remove".to_owned()]
}

/// `count` snapshots alive at once (one committed base plus `count - 1`
/// others), the daemon's RSS before, with them, and after removing them.
pub async fn rss(t: &Target, prefix: &str, count: usize, mix: RssMix, settle: Duration) -> Result<Batch, Error> {
    let mut out = Batch::default();
    let pid = t.spec.pid;
    let [before_op, with_op, growth_op, after_op] = rss_ops(count);

    let before = rss_mib(pid)?;
    let base_key = format!("{prefix}-base-layer");
    let base = format!("{prefix}-base");
    t.prepare(&base_key, "").await?;
    t.commit(&base, &base_key).await?;

    // Newest last, so removal can walk this backwards.
    let mut alive = vec![base.clone()];
    for i in 1..count {
        let key = format!("{prefix}-snap-{i}");
        out.push_duration("prepare", t.prepare(&key, &base).await?);
        if mix == RssMix::Mixed && i % 2 == 0 {
            let name = format!("{prefix}-snap-{i}-committed");
            out.push_duration("commit", t.commit(&name, &key).await?);
            alive.push(name);
        } else {
            alive.push(key);
        }
    }
    tokio::time::sleep(settle).await;
    let with = rss_mib(pid)?;

    for key in alive.iter().skip(1).rev() {
        out.push_duration("remove", t.remove(key).await?);
    }
    t.remove(&base).await?;
    tokio::time::sleep(settle).await;
    let after = rss_mib(pid)?;

    match (before, with, after) {
        (Some(before), Some(with), Some(after)) => {
            out.push(before_op, Unit::MiB, before);
            out.push(with_op, Unit::MiB, with);
            out.push(growth_op, Unit::MiB, with - before);
            out.push(after_op, Unit::MiB, after);
        }
        _ => {
            for op in [before_op, with_op, growth_op, after_op] {
                out.not_available(op, Unit::MiB, NO_PID);
            }
        }
    }
    Ok(out)
}

/// One untimed Prepare/Remove so connection set-up stays out of the samples.
pub async fn warm_up(t: &Target, prefix: &str) -> Result<(), Error> {
    let key = format!("{prefix}-warmup");
    t.prepare(&key, "").await?;
    t.remove(&key).await?;
    Ok(())
}
