//! The event-type registry: name → series, read lock-free on the hot path.
//!
//! Types are few (at most `max_event_types`) and new ones are rare, while
//! every event looks its type up. So the map is immutable and published
//! through an [`ArcSwap`]: a lookup is a thread-local-debt load plus a hash
//! probe, with no shared write; registering copies the map under a mutex
//! (O(types), at most `max_event_types` times over a process's life).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::window::Series;

/// One registered event type.
#[derive(Debug)]
pub(crate) struct TypeEntry {
    pub(crate) name: Box<str>,
    pub(crate) series: Series,
}

/// foldhash with a per-process random seed: fast on short names, and event
/// types come from clients, so the map must not be open to precomputed
/// collisions (hash flooding).
type TypeMap = HashMap<Box<str>, Arc<TypeEntry>, foldhash::fast::RandomState>;

pub(crate) struct Registry {
    map: ArcSwap<TypeMap>,
    write: Mutex<()>,
    max_types: usize,
    ring_minutes: usize,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("types", &self.map.load().len())
            .field("max_types", &self.max_types)
            .finish_non_exhaustive()
    }
}

/// The registry is full.
#[derive(Debug)]
pub(crate) struct Full;

impl Registry {
    pub(crate) fn new(max_types: usize, ring_minutes: usize) -> Registry {
        Registry {
            map: ArcSwap::from_pointee(TypeMap::default()),
            write: Mutex::new(()),
            max_types,
            ring_minutes,
        }
    }

    /// Runs `f` with the entry for `name`, registering it if new.
    #[inline]
    pub(crate) fn with_entry<R>(
        &self,
        name: &str,
        f: impl FnOnce(&TypeEntry) -> R,
    ) -> Result<R, Full> {
        {
            let map = self.map.load();
            if let Some(entry) = map.get(name) {
                return Ok(f(entry));
            }
        }
        let entry = self.register(name)?;
        Ok(f(&entry))
    }

    #[cold]
    fn register(&self, name: &str) -> Result<Arc<TypeEntry>, Full> {
        let _guard = self.write.lock();
        let current = self.map.load_full();
        if let Some(entry) = current.get(name) {
            return Ok(Arc::clone(entry));
        }
        if current.len() >= self.max_types {
            return Err(Full);
        }
        let entry = Arc::new(TypeEntry {
            name: name.into(),
            series: Series::new(self.ring_minutes),
        });
        let mut next = TypeMap::clone(&current);
        next.insert(name.into(), Arc::clone(&entry));
        self.map.store(Arc::new(next));
        tracing::debug!(
            event_type = name,
            types = current.len() + 1,
            "registered event type"
        );
        Ok(entry)
    }

    /// Every registered type (a consistent snapshot of the map).
    pub(crate) fn entries(&self) -> Vec<Arc<TypeEntry>> {
        self.map.load().values().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.load().len()
    }
}
