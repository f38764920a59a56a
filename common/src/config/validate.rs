//! The valid range of every key, checked once when the configuration is
//! loaded: a size a user or a file can set is bounded here, before it can
//! become an allocation, a busy loop or a path outside the run's folder.
//! docs/configuration.md states the same ranges.

use std::fmt::Display;
use std::ops::RangeInclusive;

use super::{Config, ConfigError};
use crate::protocol::limits::MAX_CHUNK_BYTES;

/// The highest PowerSGD rank: at 64, DCGAN-64's factors already carry a
/// quarter of its gradient's elements, which bf16 alone halves.
const MAX_POWERSGD_RANK: usize = 64;

/// Most GPUs `coordinator.gpus` may name: more than any one machine holds.
const MAX_LOCAL_GPUS: usize = 256;

/// Largest synthetic training split: fifty times CelebA.
pub const MAX_SYNTHETIC_IMAGES: usize = 10_000_000;

impl Config {
    /// Checks every key's value; [`Config::load`] already did.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        check(
            "model.image_size",
            m.image_size,
            [16, 32, 64, 128].contains(&m.image_size),
            "one of 16, 32, 64, 128",
        )?;
        within("model.nz", m.nz, 1..=1024)?;
        within("model.ngf", m.ngf, 1..=1024)?;
        within("model.ndf", m.ndf, 1..=1024)?;
        let t = &self.train;
        within("train.steps", t.steps, 1..=1_000_000_000)?;
        within("train.batch_size", t.batch_size, 1..=65_536)?;
        check(
            "train.lr",
            t.lr,
            t.lr > 0.0 && t.lr <= 1.0,
            "a number in (0, 1]",
        )?;
        check(
            "train.beta1",
            t.beta1,
            (0.0..1.0).contains(&t.beta1),
            "in [0, 1)",
        )?;
        check(
            "train.beta2",
            t.beta2,
            (0.0..1.0).contains(&t.beta2),
            "in [0, 1)",
        )?;
        within("train.log_every", t.log_every, 1..=1_000_000_000)?;
        let d = &self.data;
        check(
            "data.source",
            &d.source,
            !d.source.trim().is_empty(),
            "`synthetic` or a folder of images",
        )?;
        within(
            "data.synthetic_size",
            d.synthetic_size,
            1..=MAX_SYNTHETIC_IMAGES,
        )?;
        within("data.prefetch", d.prefetch, 1..=64)?;
        check(
            "output.dir",
            self.output.dir.display(),
            !self.output.dir.as_os_str().is_empty(),
            "a folder",
        )?;
        self.validate_coordinator()?;
        within(
            "allreduce.chunk_bytes",
            self.allreduce.chunk_bytes,
            1024..=MAX_CHUNK_BYTES / 2,
        )?;
        self.validate_checkpoint()?;
        self.validate_powersgd()?;
        self.validate_sync_every()?;
        self.validate_tls()
    }

    /// PowerSGD compresses gradients, with error feedback of its own: int8
    /// would round the factors with a second residual, and post-local SGD
    /// averages state, not gradients.
    fn validate_powersgd(&self) -> Result<(), ConfigError> {
        let rank = self.allreduce.powersgd_rank;
        within("allreduce.powersgd_rank", rank, 0..=MAX_POWERSGD_RANK)?;
        if rank == 0 {
            return Ok(());
        }
        check(
            "allreduce.wire",
            self.allreduce.wire,
            self.allreduce.wire != crate::protocol::wire::WireFormat::Int8,
            "\"f32\" or \"bf16\" with allreduce.powersgd_rank > 0: PowerSGD's factors \
             carry error feedback already",
        )?;
        check(
            "train.sync_every",
            self.train.sync_every,
            self.train.sync_every == 1,
            "1 with allreduce.powersgd_rank > 0: post-local SGD averages parameters, \
             which PowerSGD does not compress",
        )
    }

    /// Post-local SGD: replicas agree only at averaging steps, so the
    /// run's end and every checkpoint must fall on one, and what averages
    /// is state, not a gradient a rank could skip alone or round away.
    fn validate_sync_every(&self) -> Result<(), ConfigError> {
        let (h, warmup) = (self.train.sync_every, self.train.sync_warmup);
        within("train.sync_every", h, 1..=10_000)?;
        if h == 1 && self.allreduce.powersgd_rank > 0 {
            return check(
                "train.sync_warmup",
                warmup,
                warmup <= self.train.steps,
                &format!(
                    "up to train.steps ({}): PowerSGD compresses from where the warm-up ends",
                    self.train.steps
                ),
            );
        }
        if h == 1 {
            return check(
                "train.sync_warmup",
                warmup,
                warmup == 0,
                "0 with train.sync_every = 1 and no PowerSGD: every step already all-reduces \
                 its whole gradients",
            );
        }
        check(
            "train.sync_warmup",
            warmup,
            warmup.is_multiple_of(h) && warmup <= self.train.steps,
            &format!(
                "0 or a multiple of train.sync_every ({h}) up to train.steps ({}): rounds \
                 of local steps start where the warm-up ends",
                self.train.steps
            ),
        )?;
        check(
            "train.steps",
            self.train.steps,
            self.train.steps.is_multiple_of(h),
            &format!("a multiple of train.sync_every ({h}): the run ends on an averaging step"),
        )?;
        check(
            "checkpoint.every",
            self.checkpoint.every,
            self.checkpoint.every.is_multiple_of(h),
            &format!(
                "0 or a multiple of train.sync_every ({h}): replicas are identical, and \
                 checkpointable, only after an averaging step"
            ),
        )?;
        check(
            "allreduce.wire",
            self.allreduce.wire,
            self.allreduce.wire == crate::protocol::wire::WireFormat::F32,
            "\"f32\" with train.sync_every > 1: parameters and Adam moments are averaged \
             exactly (compress gradients with sync_every = 1 instead)",
        )?;
        check(
            "allreduce.nonfinite",
            self.allreduce.nonfinite,
            self.allreduce.nonfinite == super::NonFinite::Halt,
            "\"halt\" with train.sync_every > 1: a rank that skipped a local step alone \
             would leave the replicas' optimizer states apart",
        )
    }

    fn validate_coordinator(&self) -> Result<(), ConfigError> {
        let co = &self.coordinator;
        check(
            "coordinator.listen",
            &co.listen,
            co.listen
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
            "host:port, e.g. 0.0.0.0:50051 (port 0: any free port)",
        )?;
        let gpus = co.gpu_list();
        check(
            "coordinator.gpus",
            &co.gpus,
            gpus.len() <= MAX_LOCAL_GPUS
                && gpus.iter().all(|g| {
                    g.len() <= 64 && g.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
                && gpus.iter().enumerate().all(|(i, g)| !gpus[..i].contains(g)),
            "empty (every visible GPU) or distinct GPU indices or UUIDs separated by commas, \
             e.g. 0,1,2,3",
        )?;
        within("coordinator.join_timeout_s", co.join_timeout_s, 1..=86_400)?;
        within(
            "coordinator.heartbeat_interval_s",
            co.heartbeat_interval_s,
            1..=3_600,
        )?;
        check(
            "coordinator.heartbeat_timeout_s",
            co.heartbeat_timeout_s,
            co.heartbeat_timeout_s >= 2 * co.heartbeat_interval_s
                && co.heartbeat_timeout_s <= 86_400,
            "at least twice coordinator.heartbeat_interval_s (so one late heartbeat is not a loss) \
             and at most 86400",
        )?;
        within("coordinator.step_timeout_s", co.step_timeout_s, 1..=604_800)?;
        within("coordinator.max_restarts", co.max_restarts, 0..=100)?;
        within("coordinator.min_workers", co.min_workers, 0..=65_536)?;
        within(
            "coordinator.rejoin_timeout_s",
            co.rejoin_timeout_s,
            1..=86_400,
        )?;
        within(
            "coordinator.reconnect_timeout_s",
            co.reconnect_timeout_s,
            0..=86_400,
        )?;
        within(
            "coordinator.max_connections",
            co.max_connections,
            1..=65_536,
        )?;
        within(
            "coordinator.handshake_timeout_s",
            co.handshake_timeout_s,
            1..=3_600,
        )?;
        within(
            "coordinator.shutdown_grace_s",
            co.shutdown_grace_s,
            0..=3_600,
        )
    }

    fn validate_checkpoint(&self) -> Result<(), ConfigError> {
        let c = &self.checkpoint;
        check(
            "checkpoint.store",
            &c.store,
            ["s3://", "file://", "memory://"]
                .iter()
                .any(|scheme| c.store.starts_with(scheme)),
            "a URL starting with s3://, file:// or memory://",
        )?;
        check(
            "checkpoint.run",
            &c.run,
            (1..=128).contains(&c.run.len())
                && !c.run.starts_with('.')
                && c.run
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)),
            "1 to 128 letters, digits, `-`, `_` and `.`, not starting with `.`",
        )?;
        within("checkpoint.every", c.every, 0..=1_000_000_000)?;
        within("checkpoint.keep", c.keep, 1..=1_000)?;
        within("checkpoint.lease_s", c.lease_s, 3..=3_600)?;
        let s3 = &c.s3;
        check(
            "checkpoint.s3.endpoint",
            &s3.endpoint,
            s3.endpoint.is_empty()
                || s3.endpoint.starts_with("https://")
                || s3.endpoint.starts_with("http://"),
            "empty (AWS) or an http(s)://host:port URL",
        )?;
        check(
            "checkpoint.s3.allow_http",
            s3.allow_http,
            s3.allow_http || !s3.endpoint.starts_with("http://"),
            "true, since checkpoint.s3.endpoint is plain http:// (or use an https:// endpoint)",
        )?;
        check(
            "checkpoint.s3.region",
            &s3.region,
            !s3.region.is_empty(),
            "a region name (any for most S3-compatible servers, e.g. us-east-1)",
        )?;
        within("checkpoint.s3.max_retries", s3.max_retries, 0..=100)?;
        within(
            "checkpoint.s3.retry_timeout_s",
            s3.retry_timeout_s,
            1..=3_600,
        )
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        let tls = &self.tls;
        check(
            "tls.server_key",
            tls.server_key.as_ref().map(|p| p.display()),
            tls.server_cert.is_some() == tls.server_key.is_some(),
            "set together with tls.server_cert (both or neither)",
        )?;
        check(
            "tls.client_key",
            tls.client_key.as_ref().map(|p| p.display()),
            tls.client_cert.is_some() == tls.client_key.is_some(),
            "set together with tls.client_cert (both or neither)",
        )?;
        check(
            "tls.client_ca",
            tls.client_ca.as_ref().map(|p| p.display()),
            tls.client_ca.is_none() || tls.serves(),
            "only with tls.server_cert and tls.server_key: mutual TLS needs TLS",
        )
    }
}

/// `value` must lie in `range`.
fn within<T>(key: &'static str, value: T, range: RangeInclusive<T>) -> Result<(), ConfigError>
where
    T: PartialOrd + Display + Copy,
{
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key,
        value: value.to_string(),
        expected: format!("an integer from {} to {}", range.start(), range.end()),
    })
}

fn check(
    key: &'static str,
    value: impl std::fmt::Debug,
    ok: bool,
    expected: &str,
) -> Result<(), ConfigError> {
    if ok {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key,
        value: format!("{value:?}"),
        expected: expected.to_string(),
    })
}
