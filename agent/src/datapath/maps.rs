//! Typed handles on the pinned maps. The agent writes through them; `warden maps`, the tests and
//! the benchmarks read through them, so every reader sees the maps exactly as the kernel does.

use std::path::Path;

use aya::maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap};
use warden_common::{
    Config, Counter, CounterKey, EndpointInfo, EndpointKey, FastpathCounter, FastpathKernel, FlowKey, FlowValue,
    IpcacheAddr, PolicyKey, PolicyValue, RemoteInfo, ServiceKey, ServiceSplit, names,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("cannot open pinned map {path}: {source} (is the agent running, or did it ever run on this node?)")]
    Open { path: String, source: aya::maps::MapError },
    #[error("pinned map {name} has an unexpected type or layout: {source}")]
    Layout { name: &'static str, source: aya::maps::MapError },
}

pub struct Maps {
    pub config: Array<MapData, Config>,
    pub ipcache: LpmTrie<MapData, IpcacheAddr, RemoteInfo>,
    pub ipcache_hosts: HashMap<MapData, IpcacheAddr, RemoteInfo>,
    pub endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    pub cgroups: HashMap<MapData, u64, u32>,
    pub policy: HashMap<MapData, PolicyKey, PolicyValue>,
    pub flows: HashMap<MapData, FlowKey, FlowValue>,
    pub counters: PerCpuHashMap<MapData, CounterKey, Counter>,
    pub fastpath_kernel: Array<MapData, FastpathKernel>,
    pub fastpath_counters: FastPathCounterMap,
    pub services: HashMap<MapData, ServiceKey, ServiceSplit>,
}

/// `warden_fastpath_counters_v2`: what the same-node fast path did, per CPU.
pub type FastPathCounterMap = PerCpuArray<MapData, FastpathCounter>;

fn open(pin_dir: &Path, name: &'static str) -> Result<Map, MapsError> {
    let path = pin_dir.join(name);
    let data =
        MapData::from_pin(&path).map_err(|source| MapsError::Open { path: path.display().to_string(), source })?;
    Map::from_map_data(data).map_err(|source| MapsError::Layout { name, source })
}

macro_rules! typed {
    ($pin_dir:expr, $name:expr) => {
        open($pin_dir, $name)?.try_into().map_err(|source| MapsError::Layout { name: $name, source })?
    };
}

impl Maps {
    /// Open every warden map pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Maps, MapsError> {
        Ok(Maps {
            config: typed!(pin_dir, names::CONFIG),
            ipcache: typed!(pin_dir, names::IPCACHE),
            ipcache_hosts: typed!(pin_dir, names::IPCACHE_HOSTS),
            endpoints: typed!(pin_dir, names::ENDPOINTS),
            cgroups: typed!(pin_dir, names::CGROUPS),
            policy: typed!(pin_dir, names::POLICY),
            flows: typed!(pin_dir, names::FLOWS),
            counters: typed!(pin_dir, names::COUNTERS),
            fastpath_kernel: typed!(pin_dir, names::FASTPATH_KERNEL),
            fastpath_counters: typed!(pin_dir, names::FASTPATH_COUNTERS),
            services: typed!(pin_dir, names::SERVICES),
        })
    }

    /// The slotted maps' capacities (both slots together), as the kernel has them: pins adopted
    /// from an earlier agent keep the size they were made with. A map the kernel does not
    /// describe counts as built.
    pub fn capacity(&self) -> super::Entries {
        let built = super::Entries::BUILT;
        let max = |m: &MapData, built: usize| m.info().map_or(built, |i| i.max_entries() as usize);
        super::Entries {
            ipcache: max(self.ipcache.map(), built.ipcache),
            ipcache_hosts: max(self.ipcache_hosts.map(), built.ipcache_hosts),
            endpoints: max(self.endpoints.map(), built.endpoints),
            policy: max(self.policy.map(), built.policy),
            services: max(self.services.map(), built.services),
        }
    }

    /// The committed configuration (generation 0: nothing committed yet).
    pub fn config(&self) -> Config {
        self.config.get(&0, 0).unwrap_or_default()
    }
}

/// What the same-node fast path did, summed over CPUs.
pub fn fast_path_counters(array: &FastPathCounterMap) -> Result<FastpathCounter, MapsError> {
    let per_cpu = array.get(&0, 0).map_err(|source| MapsError::Layout { name: names::FASTPATH_COUNTERS, source })?;
    let mut total = FastpathCounter::default();
    per_cpu.iter().for_each(|c| total.add(c));
    Ok(total)
}
