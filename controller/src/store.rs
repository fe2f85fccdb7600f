//! The controller's etcd adapter: programs and groups with generations and optimistic
//! concurrency, and reads of hosts, liveness, assignments and status.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use corral_etcd::Etcd;
use corral_proto::fleet::{Assignment, ProgramHostStatus};
use corral_proto::keys::Keys;
use corral_proto::resource::{Group, Host, Metadata, Program};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::placement::{AssignmentWrites, Slot};

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    /// The write was based on a stale `resourceVersion`, or raced another write.
    #[error("{0}")]
    Conflict(String),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd: {0} timed out")]
    Timeout(&'static str),
    /// A stored value that does not parse.
    #[error("etcd holds an unreadable value at {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// A stored, user-declared object: Program or Group.
pub trait Object: Serialize + DeserializeOwned + Clone + Send + Sync {
    const KIND: &'static str;
    fn metadata(&self) -> &Metadata;
    fn metadata_mut(&mut self) -> &mut Metadata;
    /// Whether the two specs are the same (a change bumps `generation`).
    fn same_spec(&self, other: &Self) -> bool;
    fn key(keys: &Keys, name: &str) -> String;
    fn prefix(keys: &Keys) -> String;
    fn clear_status(&mut self);
    /// Keeps imperative markers the incoming object leaves out (a file applied after
    /// `corral restart` must not undo or repeat the restart).
    fn keep_markers_from(&mut self, _stored: &Self) {}
}

/// The parts of `Object` that Program and Group share (both resources have the same shape).
macro_rules! object {
    ($ty:ty, $kind:literal, $key:ident, $prefix:ident $(, $markers:item)?) => {
        impl Object for $ty {
            const KIND: &'static str = $kind;
            fn metadata(&self) -> &Metadata {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut Metadata {
                &mut self.metadata
            }
            fn same_spec(&self, other: &Self) -> bool {
                self.spec == other.spec
            }
            fn key(keys: &Keys, name: &str) -> String {
                keys.$key(name)
            }
            fn prefix(keys: &Keys) -> String {
                keys.$prefix()
            }
            fn clear_status(&mut self) {
                self.status = None;
            }
            $($markers)?
        }
    };
}

object!(
    Program,
    "Program",
    program,
    programs,
    fn keep_markers_from(&mut self, stored: &Self) {
        if self.spec.restarted_at.is_none() {
            self.spec.restarted_at = stored.spec.restarted_at.clone();
        }
        if self.spec.signal_request.is_none() {
            self.spec.signal_request = stored.spec.signal_request.clone();
        }
    }
);
object!(Group, "Group", group, groups);

/// The result of an apply.
#[derive(Clone, Debug)]
pub struct Applied<T> {
    pub object: T,
    pub created: bool,
    /// Spec or labels differed from what was stored (false: nothing was written).
    pub changed: bool,
}

/// etcd, seen as Corral's store.
#[derive(Clone)]
pub struct Store {
    etcd: Etcd,
    keys: Keys,
}

fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

impl Store {
    pub fn new(etcd: Etcd, keys: Keys) -> Store {
        Store { etcd, keys }
    }

    /// Runs one etcd call with a timeout; when the member is gone, moves the connection to
    /// another member (this call still fails: clients retry a 503).
    async fn within<T>(
        &self,
        what: &'static str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        let result = tokio::time::timeout(Duration::from_secs(10), f).await;
        let unavailable = match &result {
            Err(_) => true,
            Ok(Err(e)) => Etcd::is_unavailable(e),
            Ok(Ok(_)) => false,
        };
        if unavailable && let Err(e) = self.etcd.failover().await {
            tracing::warn!(error = %e, "etcd: no other member answers");
        }
        result.map_err(|_| StoreError::Timeout(what))?.map_err(Into::into)
    }

    /// The shared connection (for the election and watches).
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub async fn client(&self) -> etcd_client::Client {
        self.etcd.client().await
    }

    async fn list_raw(&self, prefix: String) -> Result<Vec<(String, Vec<u8>, i64)>, StoreError> {
        let mut c = self.etcd.client().await;
        let r = self
            .within("list", c.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                    kv.mod_revision(),
                )
            })
            .collect())
    }

    /// Every object of a kind, with `resourceVersion` set.
    ///
    /// # Errors
    /// etcd errors and unreadable values.
    pub async fn list<T: Object>(&self) -> Result<Vec<T>, StoreError> {
        self.list_raw(T::prefix(&self.keys))
            .await?
            .into_iter()
            .map(|(k, v, rev)| {
                let mut o: T = decode(k.as_bytes(), &v)?;
                o.metadata_mut().resource_version = Some(rev.to_string());
                Ok(o)
            })
            .collect()
    }

    /// One object, with `resourceVersion` set.
    ///
    /// # Errors
    /// etcd errors and unreadable values.
    pub async fn get<T: Object>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let mut c = self.etcd.client().await;
        let key = T::key(&self.keys, name);
        let r = self.within("get", c.get(key.clone(), None)).await?;
        let Some(kv) = r.kvs().first() else { return Ok(None) };
        let mut o: T = decode(kv.key(), kv.value())?;
        o.metadata_mut().resource_version = Some(kv.mod_revision().to_string());
        Ok(Some(o))
    }

    /// Creates or replaces an object (already validated).
    ///
    /// # Guarantees
    /// `generation` starts at 1 and is bumped only when the spec changes; nothing is written
    /// when neither spec nor labels change; a `resourceVersion` in `incoming` must match the
    /// stored one; the write is a transaction on the revision read, so concurrent applies
    /// cannot lose an update. With `dry_run` nothing is written.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] for a stale `resourceVersion` or a concurrent write.
    pub async fn apply<T: Object>(&self, mut incoming: T, dry_run: bool) -> Result<Applied<T>, StoreError> {
        let name = incoming.metadata().name.clone();
        let key = T::key(&self.keys, &name);
        let mut c = self.etcd.client().await;
        let r = self.within("get", c.get(key.clone(), None)).await?;
        let current: Option<(T, i64)> = match r.kvs().first() {
            Some(kv) => Some((decode(kv.key(), kv.value())?, kv.mod_revision())),
            None => None,
        };
        let wanted_rv = incoming.metadata().resource_version.clone();
        let current_rv = current.as_ref().map(|(_, rev)| rev.to_string());
        if let Some(rv) = &wanted_rv
            && Some(rv) != current_rv.as_ref()
        {
            return Err(StoreError::Conflict(format!(
                "{} {name:?} was changed since resourceVersion {rv} (now {}); get it again and retry",
                T::KIND,
                current_rv.as_deref().unwrap_or("deleted")
            )));
        }
        incoming.clear_status();
        let (generation, changed, compare) = match &current {
            None => (1, true, Compare::create_revision(key.clone(), CompareOp::Equal, 0)),
            Some((old, rev)) => {
                incoming.keep_markers_from(old);
                let spec_changed = !incoming.same_spec(old);
                let labels_changed = incoming.metadata().labels != old.metadata().labels;
                let generation = old.metadata().generation + u64::from(spec_changed);
                (
                    generation,
                    spec_changed || labels_changed,
                    Compare::mod_revision(key.clone(), CompareOp::Equal, *rev),
                )
            }
        };
        incoming.metadata_mut().generation = generation;
        incoming.metadata_mut().resource_version = None;
        if !changed || dry_run {
            incoming.metadata_mut().resource_version = current_rv;
            return Ok(Applied {
                object: incoming,
                created: current.is_none(),
                changed,
            });
        }
        let value = serde_json::to_vec(&incoming).map_err(|e| StoreError::Corrupt {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key.clone(), value, None)]);
        let resp = self.within("txn", c.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(StoreError::Conflict(format!(
                "{} {name:?} was changed concurrently; retry",
                T::KIND
            )));
        }
        let rev = resp.header().map_or(0, |h| h.revision());
        incoming.metadata_mut().resource_version = Some(rev.to_string());
        Ok(Applied {
            object: incoming,
            created: current.is_none(),
            changed: true,
        })
    }

    /// Deletes an object.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if it does not exist.
    pub async fn delete<T: Object>(&self, name: &str, dry_run: bool) -> Result<(), StoreError> {
        let mut c = self.etcd.client().await;
        let key = T::key(&self.keys, name);
        if dry_run {
            return match self.get::<T>(name).await? {
                Some(_) => Ok(()),
                None => Err(StoreError::NotFound {
                    kind: T::KIND,
                    name: name.to_string(),
                }),
            };
        }
        let r = self.within("delete", c.delete(key, None)).await?;
        if r.deleted() == 0 {
            return Err(StoreError::NotFound {
                kind: T::KIND,
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Registered hosts.
    ///
    /// # Errors
    /// etcd errors and unreadable values.
    pub async fn hosts(&self) -> Result<Vec<Host>, StoreError> {
        self.list_raw(self.keys.hosts())
            .await?
            .into_iter()
            .map(|(k, v, _)| decode(k.as_bytes(), &v))
            .collect()
    }

    /// Hosts whose agent holds its liveness lease.
    ///
    /// # Errors
    /// etcd errors.
    pub async fn alive(&self) -> Result<BTreeSet<String>, StoreError> {
        Ok(self
            .list_raw(self.keys.alive_prefix())
            .await?
            .into_iter()
            .filter_map(|(k, _, _)| self.keys.last_segment(&k).map(String::from))
            .collect())
    }

    /// Every assignment.
    ///
    /// # Errors
    /// etcd errors and unreadable values.
    pub async fn assignments(&self) -> Result<BTreeMap<Slot, Assignment>, StoreError> {
        let mut out = BTreeMap::new();
        for (k, v, _) in self.list_raw(self.keys.all_assignments()).await? {
            if let Some((h, p)) = self.keys.host_and_program(&k) {
                out.insert((h.to_string(), p.to_string()), decode(k.as_bytes(), &v)?);
            }
        }
        Ok(out)
    }

    /// Every agent report.
    ///
    /// # Errors
    /// etcd errors and unreadable values.
    pub async fn reports(&self) -> Result<BTreeMap<Slot, ProgramHostStatus>, StoreError> {
        let mut out = BTreeMap::new();
        for (k, v, _) in self.list_raw(self.keys.all_status()).await? {
            if let Some((h, p)) = self.keys.host_and_program(&k) {
                out.insert((h.to_string(), p.to_string()), decode(k.as_bytes(), &v)?);
            }
        }
        Ok(out)
    }

    /// Applies assignment writes, in transactions of at most 100 operations (etcd's default
    /// limit is 128).
    ///
    /// # Errors
    /// etcd errors.
    pub async fn write_assignments(&self, w: &AssignmentWrites) -> Result<(), StoreError> {
        let mut ops = Vec::new();
        for ((h, p), a) in &w.put {
            let v = serde_json::to_vec(a).map_err(|e| StoreError::Corrupt {
                key: p.clone(),
                reason: e.to_string(),
            })?;
            ops.push(TxnOp::put(self.keys.assignment(h, p), v, None));
        }
        for (h, p) in &w.delete {
            ops.push(TxnOp::delete(self.keys.assignment(h, p), None));
        }
        let mut c = self.etcd.client().await;
        for chunk in ops.chunks(100) {
            self.within("txn", c.txn(Txn::new().and_then(chunk.to_vec()))).await?;
        }
        Ok(())
    }
}
