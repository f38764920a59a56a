//! Which GPU each local worker trains on, as torchrun and Ray Train hand
//! them out: local rank r gets one GPU through `CUDA_VISIBLE_DEVICES`, so
//! inside the worker it is always device 0 (and every rank compiles and
//! tunes for the same device name), and learns its place from `LOCAL_RANK`
//! and `LOCAL_WORLD_SIZE`.

use std::path::Path;

/// The GPUs of a machine, in the order local ranks take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuMap {
    gpus: Vec<String>,
}

impl GpuMap {
    /// The GPUs `configured` (`coordinator.gpus`), or when it names none
    /// the ones this process can see.
    pub fn choose(configured: Vec<String>, visible: impl FnOnce() -> Vec<String>) -> Self {
        let gpus = match configured.is_empty() {
            true => visible(),
            false => configured,
        };
        Self { gpus }
    }

    /// The environment of local rank `rank` of `workers`: its GPU, when
    /// the machine has any, and its place.
    pub fn env(&self, rank: usize, workers: usize) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("LOCAL_RANK", rank.to_string()),
            ("LOCAL_WORLD_SIZE", workers.to_string()),
        ];
        if let Some(gpu) = self.gpu_of(rank) {
            env.push(("CUDA_VISIBLE_DEVICES", gpu.to_string()));
        }
        env
    }

    /// The GPU of local rank `rank`: the ranks take the GPUs in turn.
    pub fn gpu_of(&self, rank: usize) -> Option<&str> {
        (!self.gpus.is_empty()).then(|| self.gpus[rank % self.gpus.len()].as_str())
    }

    /// The GPUs, in order.
    pub fn gpus(&self) -> &[String] {
        &self.gpus
    }

    /// Whether `workers` ranks must share GPUs (fewer GPUs than workers).
    pub fn shared_by(&self, workers: usize) -> bool {
        !self.gpus.is_empty() && self.gpus.len() < workers
    }
}

/// The GPUs this process may use: `CUDA_VISIBLE_DEVICES` if it is set
/// (what a scheduler gave it), else every GPU the NVIDIA driver lists in
/// `/proc/driver/nvidia/gpus`, by index; none on a machine without one.
pub fn visible() -> Vec<String> {
    visible_from(
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        Path::new("/proc/driver/nvidia/gpus"),
    )
}

fn visible_from(variable: Option<&str>, driver: &Path) -> Vec<String> {
    if let Some(list) = variable {
        // CUDA stops at the first entry it cannot parse; so do we.
        return list
            .split(',')
            .map(str::trim)
            .take_while(|g| !g.is_empty() && !g.starts_with('-'))
            .map(String::from)
            .collect();
    }
    let count = std::fs::read_dir(driver).map_or(0, |entries| entries.count());
    (0..count).map(|i| i.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(gpus: &[&str]) -> Vec<String> {
        gpus.iter().map(|g| g.to_string()).collect()
    }

    #[test]
    fn each_local_rank_gets_its_own_gpu_and_its_place() {
        let map = GpuMap::choose(Vec::new(), || listed(&["0", "1", "2", "3"]));
        assert_eq!(
            map.env(2, 4),
            [
                ("LOCAL_RANK", "2".to_string()),
                ("LOCAL_WORLD_SIZE", "4".to_string()),
                ("CUDA_VISIBLE_DEVICES", "2".to_string()),
            ]
        );
        assert!(!map.shared_by(4));
    }

    #[test]
    fn fewer_gpus_than_workers_are_shared_in_turn() {
        let map = GpuMap::choose(listed(&["5", "7"]), || panic!("not asked when configured"));
        let gpus: Vec<_> = (0..5).map(|r| map.gpu_of(r).unwrap()).collect();
        assert_eq!(gpus, ["5", "7", "5", "7", "5"]);
        assert!(map.shared_by(3));
    }

    #[test]
    fn without_a_gpu_workers_get_only_their_place() {
        let map = GpuMap::choose(Vec::new(), Vec::new);
        assert_eq!(
            map.env(0, 1),
            [
                ("LOCAL_RANK", "0".to_string()),
                ("LOCAL_WORLD_SIZE", "1".to_string())
            ]
        );
        assert!(!map.shared_by(4));
    }

    #[test]
    fn visible_gpus_come_from_the_scheduler_s_variable_or_the_driver() {
        let driver = tempfile::tempdir().unwrap();
        for bus in ["0000:17:00.0", "0000:65:00.0"] {
            std::fs::create_dir(driver.path().join(bus)).unwrap();
        }
        assert_eq!(visible_from(None, driver.path()), ["0", "1"]);
        assert_eq!(
            visible_from(Some("GPU-8f3a,GPU-1b2c"), driver.path()),
            ["GPU-8f3a", "GPU-1b2c"]
        );
        assert!(
            visible_from(Some(""), driver.path()).is_empty(),
            "hidden by the scheduler"
        );
        assert_eq!(visible_from(Some("3,-1,4"), driver.path()), ["3"]);
        assert!(visible_from(None, &driver.path().join("absent")).is_empty());
    }
}
