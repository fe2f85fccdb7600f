//! The controller's etcd adapter: programs and groups with generations and optimistic
//! concurrency, and reads of hosts, liveness, assignments and status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use corral_etcd::Etcd;
use corral_proto::api::{AuditEntry, AutoRevert, ProgramControl, Revision, Role, RolloutState};
use corral_proto::fleet::{Assignment, ControlPlaneHealth, ProgramHostStatus};
use corral_proto::keys::Keys;
use corral_proto::logs::{LogReply, LogRequest, Logs, LogsQuery};
use corral_proto::resource::{Group, Host, HostControl, Kind, Metadata, Program};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
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
    /// A change the object cannot take.
    #[error("{0}")]
    Invalid(String),
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
    const RESOURCE: Kind;
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
    ($ty:ident, $kind:literal, $key:ident, $prefix:ident $(, $markers:item)?) => {
        impl Object for $ty {
            const KIND: &'static str = $kind;
            const RESOURCE: Kind = Kind::$ty;
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

/// Who makes a write: a token's name and role, recorded in the audit with what it changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    pub name: String,
    pub role: Role,
}

/// An audit entry ready to go into a write's transaction.
struct Audit {
    entry: AuditEntry,
    key: String,
    value: Vec<u8>,
}

impl Audit {
    /// The entry's key must be new (two writes in one microsecond cannot share it).
    fn is_new(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, 0)
    }

    fn put(&self) -> TxnOp {
        TxnOp::put(self.key.clone(), self.value.clone(), None)
    }
}

/// Audit entries kept; older ones are removed (a few MB in etcd at most).
pub const AUDIT_KEEP: usize = 10_000;

/// Audited writes between two prunings of old entries.
const PRUNE_EVERY: u64 = 64;

/// What an audit entry says changed: paths of spec and labels fields (for a new object, the
/// fields it sets).
fn audited_changes<T: Serialize>(old: Option<&T>, new: Option<&T>) -> Vec<String> {
    let view = |o: Option<&T>| {
        let v = o.and_then(|o| serde_json::to_value(o).ok()).unwrap_or_default();
        serde_json::json!({
            "metadata": {"labels": v.pointer("/metadata/labels").cloned().unwrap_or_default()},
            "spec": v.get("spec").cloned().unwrap_or_default(),
        })
    };
    corral_proto::api::changed_fields(&view(old), &view(new))
}

/// Unix microseconds, never the same twice in this process (audit keys are unique per write).
fn audit_micros() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

fn rfc3339(micros: u64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

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
    unreadable: std::sync::Arc<std::sync::Mutex<BTreeMap<String, String>>>,
    /// Audited writes so far (every [`PRUNE_EVERY`]th prunes old entries).
    audited: Arc<std::sync::atomic::AtomicU64>,
}

pub use corral_etcd::PAGE;

/// How long a log read waits for the agents' replies.
pub const LOG_WAIT: Duration = Duration::from_secs(5);

/// Operations per assignment transaction, below etcd's default `--max-txn-ops` (128); with
/// specs of at most 32 KiB, below its 1.5 MiB request limit too.
pub const TXN_OPS: usize = 32;

/// Assignment transactions in flight at once.
const TXN_CONCURRENCY: usize = 8;

/// Who may write assignments: the leader's election key and its creation revision. Every
/// assignment transaction compares it, so a paused old leader can never write after a new one
/// leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

/// What a batch of assignment writes did not do, per slot, and why (etcd refused it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteFailures(pub BTreeMap<Slot, String>);

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

impl Store {
    pub fn new(etcd: Etcd, keys: Keys) -> Store {
        Store {
            etcd,
            keys,
            unreadable: Default::default(),
            audited: Default::default(),
        }
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

    /// Every key under `prefix` with its value and mod revision (see [`Store::scan`]).
    async fn list_raw(&self, prefix: String) -> Result<Vec<(String, Vec<u8>, i64)>, StoreError> {
        let mut out = Vec::new();
        self.scan(&prefix, |k, v, rev| out.push((k.to_string(), v.to_vec(), rev)))
            .await?;
        Ok(out)
    }

    /// Calls `f` with every key, value and mod revision under `prefix`, read in pages of
    /// [`PAGE`] keys at one revision (a consistent snapshot: no answer nears gRPC's 4 MiB
    /// limit, however large the fleet), one page in memory at a time. Returns that revision,
    /// from which a watch continues.
    ///
    /// # Errors
    /// etcd errors.
    pub async fn scan(&self, prefix: &str, mut f: impl FnMut(&str, &[u8], i64)) -> Result<i64, StoreError> {
        let c = self.etcd.client().await;
        corral_etcd::read_pages(
            prefix,
            |key, opts| {
                let mut c = c.clone();
                async move { self.within("scan", c.get(key, Some(opts))).await }
            },
            |kv| f(&String::from_utf8_lossy(kv.key()), kv.value(), kv.mod_revision()),
        )
        .await
    }

    /// Decodes what `list_raw` read; a value that does not parse is left out and recorded in
    /// [`Store::unreadable`], so one bad key never hides the rest.
    fn decode_all<T: DeserializeOwned>(&self, prefix: &str, raw: Vec<(String, Vec<u8>, i64)>) -> Vec<(String, T, i64)> {
        let mut bad = BTreeMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (k, v, rev) in raw {
            match decode::<T>(k.as_bytes(), &v) {
                Ok(o) => out.push((k, o, rev)),
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "skipping an unreadable value");
                    bad.insert(k, e.to_string());
                }
            }
        }
        if let Ok(mut u) = self.unreadable.lock() {
            u.retain(|k, _| !k.starts_with(prefix));
            u.extend(bad);
        }
        out
    }

    /// Records the control plane's health for every replica (and `corral status`) to read.
    ///
    /// # Errors
    /// etcd errors.
    pub async fn put_health(&self, health: &ControlPlaneHealth) -> Result<(), StoreError> {
        let mut c = self.etcd.client().await;
        let v = encode(&self.keys.controller_health(), health)?;
        self.within("put health", c.put(self.keys.controller_health(), v, None))
            .await?;
        Ok(())
    }

    /// The control plane's health as the leader last recorded it (empty if none).
    ///
    /// # Errors
    /// etcd errors.
    pub async fn health(&self) -> Result<ControlPlaneHealth, StoreError> {
        let mut c = self.etcd.client().await;
        let r = self
            .within("get health", c.get(self.keys.controller_health(), None))
            .await?;
        Ok(r.kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok())
            .unwrap_or_default())
    }

    /// Keys whose values did not parse when last listed, with why.
    pub fn unreadable(&self) -> BTreeMap<String, String> {
        self.unreadable.lock().map(|u| u.clone()).unwrap_or_default()
    }

    /// Every readable object of a kind, with `resourceVersion` set (see [`Store::unreadable`]).
    ///
    /// # Errors
    /// etcd errors.
    pub async fn list<T: Object>(&self) -> Result<Vec<T>, StoreError> {
        Ok(self.list_at().await?.0)
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

    /// Changes the stored object `name` with `f` in one read-modify-write, read again and
    /// retried when another write came in between, so concurrent updates all take effect.
    ///
    /// # Errors
    /// `NotFound`; what `f` refuses (as `Invalid`); etcd errors; a conflict that outlasts
    /// the retries.
    pub async fn update<T: Object>(
        &self,
        name: &str,
        by: &Author,
        verb: &str,
        f: impl Fn(&mut T) -> Result<(), String>,
    ) -> Result<Applied<T>, StoreError> {
        let mut attempt = 0u32;
        loop {
            let mut current = self.get::<T>(name).await?.ok_or_else(|| StoreError::NotFound {
                kind: T::KIND,
                name: name.to_string(),
            })?;
            f(&mut current).map_err(StoreError::Invalid)?;
            // `get` sets the resource version it read: `apply` writes only on that one.
            match self.write(current, false, by, Some(verb), None, Vec::new()).await {
                Err(StoreError::Conflict(_)) if attempt < 20 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 3)).await;
                }
                other => return other,
            }
        }
    }

    /// Creates or replaces an object (already validated).
    ///
    /// # Guarantees
    /// `generation` starts at 1 and is bumped only when the spec changes; nothing is written
    /// when neither spec nor labels change; a `resourceVersion` in `incoming` must match the
    /// stored one; the write is a transaction on the revision read, so concurrent applies
    /// cannot lose an update. With `dry_run` nothing is written.
    ///
    /// A write is recorded in the audit (who, when, which fields) in the same transaction:
    /// no change without its record.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] for a stale `resourceVersion` or a concurrent write.
    pub async fn apply<T: Object>(&self, incoming: T, dry_run: bool, by: &Author) -> Result<Applied<T>, StoreError> {
        self.write(incoming, dry_run, by, None, None, Vec::new()).await
    }

    /// [`Store::apply`], recorded in the audit as `verb` (`undo`, say).
    ///
    /// # Errors
    /// As [`Store::apply`].
    pub async fn apply_as<T: Object>(&self, incoming: T, by: &Author, verb: &str) -> Result<Applied<T>, StoreError> {
        self.write(incoming, false, by, Some(verb), None, Vec::new()).await
    }

    /// [`Store::apply`], recorded as `verb` (default `create` or `apply`).
    /// [`Store::apply`], written only if no object of its kind changed since revision `read`
    /// (a decision taken over all of them, such as a dependency cycle check, still holds);
    /// [`StoreError::Conflict`] otherwise.
    ///
    /// # Errors
    /// As [`Store::apply`].
    pub async fn apply_unchanged_since<T: Object>(
        &self,
        incoming: T,
        dry_run: bool,
        by: &Author,
        read: i64,
    ) -> Result<Applied<T>, StoreError> {
        let guard = Compare::mod_revision(T::prefix(&self.keys), CompareOp::Less, read + 1).with_prefix();
        self.write(incoming, dry_run, by, None, Some(guard), Vec::new()).await
    }

    /// Every object of a kind, and the revision they were read at.
    ///
    /// # Errors
    /// etcd errors.
    pub async fn list_at<T: Object>(&self) -> Result<(Vec<T>, i64), StoreError> {
        let prefix = T::prefix(&self.keys);
        let mut raw = Vec::new();
        let rev = self
            .scan(&prefix, |k, v, r| raw.push((k.to_string(), v.to_vec(), r)))
            .await?;
        let objects = self
            .decode_all::<T>(&prefix, raw)
            .into_iter()
            .map(|(_, mut o, r)| {
                o.metadata_mut().resource_version = Some(r.to_string());
                o
            })
            .collect();
        Ok((objects, rev))
    }

    async fn write<T: Object>(
        &self,
        mut incoming: T,
        dry_run: bool,
        by: &Author,
        verb: Option<&str>,
        guard: Option<Compare>,
        also: Vec<TxnOp>,
    ) -> Result<Applied<T>, StoreError> {
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
        let value = encode(&key, &incoming)?;
        let audit = self.audit(
            by,
            verb.unwrap_or(if current.is_none() { "create" } else { "apply" }),
            (T::RESOURCE, &name),
            Some(generation),
            audited_changes(current.as_ref().map(|(o, _)| o), Some(&incoming)),
        )?;
        let mut ops = vec![TxnOp::put(key.clone(), value, None), audit.put()];
        ops.extend(also);
        // A program's new generation is kept as a revision (for `rollout history` and
        // `undo`), the oldest beyond `Revision::KEEP` dropped, in the same transaction.
        let new_generation = current
            .as_ref()
            .is_none_or(|(old, _)| old.metadata().generation != generation);
        if T::RESOURCE == Kind::Program && new_generation {
            ops.extend(self.revision_ops(&name, generation, &audit.entry, &incoming)?);
        }
        let txn = Txn::new()
            .when([compare, audit.is_new()].into_iter().chain(guard).collect::<Vec<_>>())
            .and_then(ops);
        let resp = self.within("txn", c.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(StoreError::Conflict(format!(
                "{} {name:?} was changed concurrently; retry",
                T::KIND
            )));
        }
        self.audited_one();
        let rev = resp.header().map_or(0, |h| h.revision());
        incoming.metadata_mut().resource_version = Some(rev.to_string());
        Ok(Applied {
            object: incoming,
            created: current.is_none(),
            changed: true,
        })
    }

    /// Deletes an object, recorded in the audit in the same transaction.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if it does not exist; a conflict if it changed meanwhile.
    pub async fn delete<T: Object>(&self, name: &str, dry_run: bool, by: &Author) -> Result<(), StoreError> {
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
        let r = self.within("get", c.get(key.clone(), None)).await?;
        let Some(kv) = r.kvs().first() else {
            return Err(StoreError::NotFound {
                kind: T::KIND,
                name: name.to_string(),
            });
        };
        let audit = self.audit(by, "delete", (T::RESOURCE, name), None, Vec::new())?;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                audit.is_new(),
            ])
            .and_then({
                let mut ops = vec![TxnOp::delete(key, None), audit.put()];
                if T::RESOURCE == Kind::Program {
                    // A program made again later starts at generation 1, with no old history.
                    ops.push(TxnOp::delete(
                        self.keys.revisions(name),
                        Some(etcd_client::DeleteOptions::new().with_prefix()),
                    ));
                    ops.push(TxnOp::delete(self.keys.program_control(name), None));
                    ops.push(TxnOp::delete(self.keys.rollout_state(name), None));
                }
                ops
            });
        let resp = self.within("txn", c.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(StoreError::Conflict(format!(
                "{} {name:?} was changed concurrently; retry",
                T::KIND
            )));
        }
        self.audited_one();
        Ok(())
    }

    /// Puts `generation` of program `name` as a revision and drops those older than the last
    /// [`Revision::KEEP`].
    fn revision_ops<T: Object>(
        &self,
        name: &str,
        generation: u64,
        entry: &AuditEntry,
        object: &T,
    ) -> Result<Vec<TxnOp>, StoreError> {
        let key = self.keys.revision(name, generation);
        let spec = serde_json::to_value(object)
            .ok()
            .and_then(|v| v.get("spec").cloned())
            .unwrap_or_default();
        let value = encode(
            &key,
            &serde_json::json!({
                "generation": generation,
                "at": entry.at,
                "who": entry.who,
                "spec": spec,
            }),
        )?;
        let mut ops = vec![TxnOp::put(key, value, None)];
        if generation > Revision::KEEP {
            ops.push(TxnOp::delete(
                self.keys.revision(name, 0),
                Some(
                    etcd_client::DeleteOptions::new()
                        .with_range(self.keys.revision(name, generation - Revision::KEEP + 1)),
                ),
            ));
        }
        Ok(ops)
    }

    /// A program's kept revisions, newest first.
    ///
    /// # Errors
    /// etcd errors; an unreadable revision is skipped.
    pub async fn revisions(&self, name: &str) -> Result<Vec<Revision>, StoreError> {
        let mut out = Vec::new();
        self.scan(&self.keys.revisions(name), |_, v, _| {
            if let Ok(r) = serde_json::from_slice::<Revision>(v) {
                out.push(r);
            }
        })
        .await?;
        out.reverse();
        Ok(out)
    }

    /// Reads `program`'s logs on `hosts` through their agents: one `LogRequest` per host
    /// (leased, so a request no one answers goes away), then the replies that arrive within
    /// [`LOG_WAIT`]; a host that does not answer in time is named in `errors`. Requests and
    /// replies are deleted once read.
    ///
    /// # Errors
    /// etcd errors.
    pub async fn logs(&self, program: &str, hosts: &[String], query: &LogsQuery) -> Result<Logs, StoreError> {
        use std::hash::BuildHasher as _;
        let mut out = Logs::default();
        if hosts.is_empty() {
            return Ok(out);
        }
        let mut c = self.etcd.client().await;
        let micros = audit_micros();
        let id = format!(
            "{micros}-{:016x}",
            std::collections::hash_map::RandomState::new().hash_one(micros)
        );
        let lease = self.within("lease grant", c.lease_grant(60, None)).await?.id();
        let ops: Vec<TxnOp> = hosts
            .iter()
            .map(|h| {
                let request = LogRequest {
                    program: program.to_string(),
                    stream: query.stream,
                    bytes: query.bytes,
                    offsets: query.offsets.get(h).cloned().unwrap_or_default(),
                    files: query.files.get(h).cloned().unwrap_or_default(),
                    tail: query.tail,
                };
                let value = serde_json::to_vec(&request).unwrap_or_default();
                TxnOp::put(
                    self.keys.log_request(h, &id),
                    value,
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        let mut first = None;
        for chunk in ops.chunks(TXN_OPS) {
            let resp = self
                .within("log requests", c.txn(Txn::new().and_then(chunk.to_vec())))
                .await?;
            first.get_or_insert(resp.header().map_or(0, |h| h.revision()));
        }
        let from = first.unwrap_or(0);
        let mut waiting: BTreeMap<String, String> =
            hosts.iter().map(|h| (self.keys.log_reply(h, &id), h.clone())).collect();
        let mut stream = self
            .within(
                "watch log replies",
                corral_etcd::watch(
                    &c,
                    self.keys.all_logs(),
                    Some(etcd_client::WatchOptions::new().with_prefix().with_start_revision(from)),
                ),
            )
            .await?;
        let deadline = tokio::time::Instant::now() + LOG_WAIT;
        while !waiting.is_empty() {
            let msg = match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => break,
                Ok(m) => m?,
            };
            let Some(resp) = msg else { break };
            for ev in resp.events() {
                let (etcd_client::EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) else {
                    continue;
                };
                let Some(host) = kv.key_str().ok().and_then(|k| waiting.remove(k)) else {
                    continue;
                };
                match serde_json::from_slice::<LogReply>(kv.value()) {
                    Ok(reply) => {
                        out.chunks.extend(reply.chunks.into_iter().map(|mut ch| {
                            ch.host = host.clone();
                            ch
                        }));
                        if let Some(e) = reply.error {
                            out.errors.insert(host, e);
                        }
                    }
                    Err(e) => {
                        out.errors
                            .insert(host, format!("its agent's reply does not parse: {e}"));
                    }
                }
            }
        }
        for host in waiting.into_values() {
            out.errors.insert(
                host,
                format!(
                    "no answer from its agent within {}s (is it connected to etcd?)",
                    LOG_WAIT.as_secs()
                ),
            );
        }
        // Requests go with their lease; replies are deleted (their own lease would take 60 s).
        let _ = self.within("revoke log requests", c.lease_revoke(lease)).await;
        let deletes: Vec<TxnOp> = hosts
            .iter()
            .map(|h| TxnOp::delete(self.keys.log_reply(h, &id), None))
            .collect();
        for chunk in deletes.chunks(TXN_OPS) {
            let _ = self
                .within("delete log replies", c.txn(Txn::new().and_then(chunk.to_vec())))
                .await;
        }
        out.chunks
            .sort_by(|a, b| (&a.host, &a.process).cmp(&(&b.host, &b.process)));
        Ok(out)
    }

    /// The leader's record of each program's rollouts.
    ///
    /// # Errors
    /// etcd errors.
    pub async fn rollout_states(&self) -> Result<BTreeMap<String, RolloutState>, StoreError> {
        let prefix = self.keys.rollout_states();
        let raw = self.list_raw(prefix.clone()).await?;
        Ok(self
            .decode_all::<RolloutState>(&prefix, raw)
            .into_iter()
            .filter_map(|(k, s, _)| Some((k.strip_prefix(&prefix)?.to_string(), s)))
            .collect())
    }

    /// Records that `generation` of `program` ran, ready, everywhere (what an automatic
    /// revert goes back to).
    ///
    /// # Errors
    /// etcd errors.
    pub async fn record_last_good(&self, program: &str, generation: u64) -> Result<(), StoreError> {
        let key = self.keys.rollout_state(program);
        let mut c = self.etcd.client().await;
        let r = self.within("get", c.get(key.clone(), None)).await?;
        let (mut state, compare) = match r.kvs().first() {
            Some(kv) => (
                decode::<RolloutState>(kv.key(), kv.value())?,
                Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
            ),
            None => (
                RolloutState::default(),
                Compare::version(key.clone(), CompareOp::Equal, 0),
            ),
        };
        if state.last_good >= Some(generation) {
            return Ok(());
        }
        state.last_good = Some(generation);
        let value = encode(&key, &state)?;
        // Only while the program exists: a delete takes its state with it.
        let txn = Txn::new()
            .when([
                compare,
                Compare::version(self.keys.program(program), CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(key, value, None)]);
        self.within("txn", c.txn(txn)).await?;
        Ok(())
    }

    /// Puts back the spec of generation `to` of `program`, whose generation `failed` failed
    /// on `host`, as a new generation (restart and signal markers as they are), recorded in
    /// its rollout state in the same transaction; audited as `auto-revert` by the
    /// controller. Nothing happens if the program has moved past `failed` meanwhile. A revert
    /// that cannot be made (the revision is no longer kept, it no longer validates) is
    /// recorded all the same, so it is not tried again.
    ///
    /// # Errors
    /// etcd errors; [`StoreError::Invalid`] when the revert cannot be made.
    pub async fn auto_revert(
        &self,
        program: &str,
        failed: u64,
        to: u64,
        host: &str,
    ) -> Result<Option<u64>, StoreError> {
        let Some(current) = self.get::<Program>(program).await? else {
            return Ok(None);
        };
        if current.metadata.generation != failed {
            return Ok(None);
        }
        let key = self.keys.rollout_state(program);
        let mut c = self.etcd.client().await;
        let r = self.within("get", c.get(key.clone(), None)).await?;
        let mut state = match r.kvs().first() {
            Some(kv) => decode::<RolloutState>(kv.key(), kv.value())?,
            None => RolloutState::default(),
        };
        let mut record = AutoRevert {
            failed_generation: failed,
            host: host.to_string(),
            to_generation: to,
            revert_generation: 0,
            at: rfc3339(audit_micros()),
            not_reverted: None,
        };
        let controller = Author {
            name: "controller".to_string(),
            role: Role::Admin,
        };
        let target = self.revisions(program).await?.into_iter().find(|r| r.generation == to);
        let next = target
            .ok_or_else(|| format!("generation {to} is no longer kept"))
            .and_then(|t| {
                corral_proto::validate_program(t.applied_to(&current))
                    .map(corral_proto::Valid::into_inner)
                    .map_err(|e| e.to_string())
            });
        let next = match next {
            Ok(next) if next.spec != current.spec => next,
            other => {
                // Nothing to write, or nothing that can be: recorded, so not tried again.
                let why = match &other {
                    Err(why) => why.clone(),
                    Ok(_) => format!(
                        "generation {failed} has the spec of generation {to} (a restart): there is nothing to put back"
                    ),
                };
                tracing::warn!(program, failed, host, "generation failed and is not reverted: {why}");
                record.not_reverted = Some(why);
                state.reverted = Some(record);
                let value = encode(&key, &state)?;
                self.within("put", c.put(key, value, None)).await?;
                return match other {
                    Err(why) => Err(StoreError::Invalid(format!("cannot revert {program}: {why}"))),
                    Ok(_) => Ok(None),
                };
            }
        };
        record.revert_generation = failed + 1;
        state.reverted = Some(record);
        state.last_good = Some(to);
        let value = encode(&key, &state)?;
        // `current` carries the resource version read: written only if still at `failed`.
        let applied = self
            .write(
                next,
                false,
                &controller,
                Some("auto-revert"),
                None,
                vec![TxnOp::put(key, value, None)],
            )
            .await?;
        Ok(Some(applied.object.metadata.generation))
    }

    /// Every paused program.
    ///
    /// # Errors
    /// etcd errors.
    pub async fn paused(&self) -> Result<BTreeSet<String>, StoreError> {
        let prefix = self.keys.program_controls();
        let raw = self.list_raw(prefix.clone()).await?;
        Ok(self
            .decode_all::<ProgramControl>(&prefix, raw)
            .into_iter()
            .filter(|(_, c, _)| c.paused)
            .filter_map(|(k, _, _)| Some(k.strip_prefix(&prefix)?.to_string()))
            .collect())
    }

    /// Pauses or resumes program `name`'s rollout, with its audit entry, in one transaction
    /// conditioned on the program existing.
    ///
    /// # Errors
    /// `NotFound`; etcd errors.
    pub async fn set_paused(&self, name: &str, paused: bool, by: &Author) -> Result<(), StoreError> {
        let key = self.keys.program_control(name);
        let program_key = self.keys.program(name);
        let mut c = self.etcd.client().await;
        let verb = if paused { "pause" } else { "resume" };
        let audit = self.audit(
            by,
            verb,
            (Kind::Program, name),
            None,
            vec!["rollout.paused".to_string()],
        )?;
        let value = encode(&key, &ProgramControl { paused })?;
        let txn = Txn::new()
            .when([Compare::version(program_key, CompareOp::Greater, 0), audit.is_new()])
            .and_then([TxnOp::put(key, value, None), audit.put()]);
        if !self.within("txn", c.txn(txn)).await?.succeeded() {
            return Err(StoreError::NotFound {
                kind: "Program",
                name: name.to_string(),
            });
        }
        self.audited_one();
        Ok(())
    }

    /// The audit entry of a write by `by` now, and its key and value (a key no write has
    /// used: the transaction checks it is new).
    fn audit(
        &self,
        by: &Author,
        verb: &str,
        (kind, name): (Kind, &str),
        generation: Option<u64>,
        changes: Vec<String>,
    ) -> Result<Audit, StoreError> {
        let micros = audit_micros();
        let entry = AuditEntry {
            at: rfc3339(micros),
            who: by.name.clone(),
            role: by.role,
            verb: verb.to_string(),
            kind,
            name: name.to_string(),
            generation,
            changes,
        };
        let key = self.keys.audit_entry(micros);
        let value = encode(&key, &entry)?;
        Ok(Audit { entry, key, value })
    }

    /// Counts an audited write; every [`PRUNE_EVERY`]th removes entries beyond
    /// [`AUDIT_KEEP`], in the background.
    fn audited_one(&self) {
        if self
            .audited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(PRUNE_EVERY)
        {
            let store = self.clone();
            tokio::spawn(async move {
                if let Err(e) = store.prune_audit(AUDIT_KEEP).await {
                    tracing::warn!(error = %e, "cannot prune the audit");
                }
            });
        }
    }

    /// Removes the oldest audit entries beyond `keep`.
    ///
    /// # Errors
    /// etcd errors.
    pub async fn prune_audit(&self, keep: usize) -> Result<(), StoreError> {
        use etcd_client::{DeleteOptions, GetOptions, SortOrder, SortTarget};
        let prefix = self.keys.audit();
        let mut c = self.etcd.client().await;
        let count = self
            .within(
                "count",
                c.get(prefix.clone(), Some(GetOptions::new().with_prefix().with_count_only())),
            )
            .await?
            .count();
        let excess = usize::try_from(count).unwrap_or(0).saturating_sub(keep);
        if excess == 0 {
            return Ok(());
        }
        let oldest = self
            .within(
                "get",
                c.get(
                    prefix.clone(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_sort(SortTarget::Key, SortOrder::Ascend)
                            .with_limit(i64::try_from(excess).unwrap_or(i64::MAX)),
                    ),
                ),
            )
            .await?;
        let Some(last) = oldest.kvs().last() else { return Ok(()) };
        let mut end = last.key().to_vec();
        end.push(0);
        self.within("delete", c.delete(prefix, Some(DeleteOptions::new().with_range(end))))
            .await?;
        Ok(())
    }

    /// The last `limit` audit entries, newest first; only those of `kind` and `name` when
    /// given. An entry that does not parse is skipped.
    ///
    /// # Errors
    /// etcd errors.
    pub async fn history(
        &self,
        kind: Option<Kind>,
        name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = std::collections::VecDeque::new();
        self.scan(&self.keys.audit(), |_, v, _| {
            let Ok(e) = serde_json::from_slice::<AuditEntry>(v) else {
                return;
            };
            if kind.is_some_and(|k| k != e.kind) || name.is_some_and(|n| n != e.name) {
                return;
            }
            out.push_back(e);
            if out.len() > limit {
                out.pop_front();
            }
        })
        .await?;
        Ok(out.into_iter().rev().collect())
    }

    /// Registered hosts.
    ///
    /// # Errors
    /// etcd errors and unreadable values.
    pub async fn hosts(&self) -> Result<Vec<Host>, StoreError> {
        let prefix = self.keys.hosts();
        let raw = self.list_raw(prefix.clone()).await?;
        let controls_prefix = self.keys.host_controls();
        let controls: BTreeMap<String, HostControl> = self
            .decode_all(&controls_prefix, self.list_raw(controls_prefix.clone()).await?)
            .into_iter()
            .filter_map(|(k, c, _)| Some((k.strip_prefix(&controls_prefix)?.to_string(), c)))
            .collect();
        Ok(self
            .decode_all::<Host>(&prefix, raw)
            .into_iter()
            .map(|(_, h, _)| match controls.get(&h.metadata.name) {
                Some(c) => c.effective(&h),
                None => h,
            })
            .collect())
    }

    /// Changes what operators set on registered host `name` (labels, cordon, drain) in one
    /// read-modify-write, recorded in the audit as `verb` in the same transaction; retried
    /// when another write came in between. Returns the host as placement now sees it.
    ///
    /// # Errors
    /// `NotFound` for a host that never registered; etcd errors; a conflict that outlasts the
    /// retries.
    pub async fn update_host(
        &self,
        name: &str,
        by: &Author,
        verb: &str,
        f: impl Fn(&mut HostControl),
    ) -> Result<Host, StoreError> {
        let host_key = self.keys.host(name);
        let key = self.keys.host_control(name);
        let mut c = self.etcd.client().await;
        for attempt in 0..20u32 {
            let r = self.within("get", c.get(host_key.clone(), None)).await?;
            let Some(kv) = r.kvs().first() else {
                return Err(StoreError::NotFound {
                    kind: "Host",
                    name: name.to_string(),
                });
            };
            let registered: Host = decode(kv.key(), kv.value())?;
            let r = self.within("get", c.get(key.clone(), None)).await?;
            let (old, compare) = match r.kvs().first() {
                Some(kv) => (
                    decode::<HostControl>(kv.key(), kv.value())?,
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (
                    HostControl::default(),
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                ),
            };
            let mut new = old.clone();
            f(&mut new);
            let effective = new.effective(&registered);
            let before = old.effective(&registered);
            // Nothing that placement sees changes (removing a label the host does not have,
            // cordoning a cordoned host): nothing written, nothing audited.
            let placed = |h: &Host| {
                let mut h = h.clone();
                h.status = None;
                h
            };
            let (placed_before, placed_after) = (placed(&before), placed(&effective));
            if new == old || placed_before == placed_after {
                return Ok(effective);
            }
            let changes = audited_changes(Some(&placed_before), Some(&placed_after));
            let audit = self.audit(by, verb, (Kind::Host, name), None, changes)?;
            let value = encode(&key, &new)?;
            let txn = Txn::new()
                .when([compare, audit.is_new()])
                .and_then([TxnOp::put(key.clone(), value, None), audit.put()]);
            if self.within("txn", c.txn(txn)).await?.succeeded() {
                self.audited_one();
                return Ok(effective);
            }
            tokio::time::sleep(Duration::from_millis(u64::from(attempt + 1) * 3)).await;
        }
        Err(StoreError::Conflict(format!(
            "host {name:?} kept changing concurrently; retry"
        )))
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

    /// `program`'s reports from `hosts` (those that have one): a get per host, in
    /// transactions of [`TXN_OPS`], so one program's status never reads every program's.
    ///
    /// # Errors
    /// etcd errors.
    pub async fn reports_of(
        &self,
        program: &str,
        hosts: &[String],
    ) -> Result<BTreeMap<Slot, ProgramHostStatus>, StoreError> {
        let mut c = self.etcd.client().await;
        let mut out = BTreeMap::new();
        for chunk in hosts.chunks(TXN_OPS) {
            let gets: Vec<TxnOp> = chunk
                .iter()
                .map(|h| TxnOp::get(self.keys.status(h, program), None))
                .collect();
            let resp = self.within("get reports", c.txn(Txn::new().and_then(gets))).await?;
            for op in resp.op_responses() {
                let etcd_client::TxnOpResponse::Get(get) = op else {
                    continue;
                };
                for kv in get.kvs() {
                    let key = String::from_utf8_lossy(kv.key());
                    let Some((host, _)) = self.keys.host_and_program(&key) else {
                        continue;
                    };
                    match decode::<ProgramHostStatus>(kv.key(), kv.value()) {
                        Ok(r) => {
                            out.insert((host.to_string(), program.to_string()), r);
                        }
                        Err(e) => {
                            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "skipping an unreadable value");
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every assignment.
    ///
    /// # Errors
    /// etcd errors and unreadable values.
    pub async fn assignments(&self) -> Result<BTreeMap<Slot, Assignment>, StoreError> {
        let prefix = self.keys.all_assignments();
        let raw = self.list_raw(prefix.clone()).await?;
        let mut out = BTreeMap::new();
        for (k, a, _) in self.decode_all::<Assignment>(&prefix, raw) {
            if let Some((h, p)) = self.keys.host_and_program(&k) {
                out.insert((h.to_string(), p.to_string()), a);
            }
        }
        Ok(out)
    }

    /// Every agent report.
    ///
    /// # Errors
    /// etcd errors and unreadable values.
    pub async fn reports(&self) -> Result<BTreeMap<Slot, ProgramHostStatus>, StoreError> {
        let prefix = self.keys.all_status();
        let raw = self.list_raw(prefix.clone()).await?;
        let mut out = BTreeMap::new();
        for (k, r, _) in self.decode_all::<ProgramHostStatus>(&prefix, raw) {
            if let Some((h, p)) = self.keys.host_and_program(&k) {
                out.insert((h.to_string(), p.to_string()), r);
            }
        }
        Ok(out)
    }

    /// Applies assignment writes: transactions of at most [`TXN_OPS`] operations, several in
    /// flight at once, each conditioned on `fence` (still the leader). A transaction etcd
    /// refuses for its content (too large, ...) is retried one operation at a time, and what
    /// still fails is returned per slot, so one bad object never stops the others.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the fence no longer holds (leadership lost); etcd being
    /// unreachable.
    pub async fn write_assignments(
        &self,
        w: &AssignmentWrites,
        fence: Option<&Fence>,
    ) -> Result<WriteFailures, StoreError> {
        let mut failures = WriteFailures::default();
        // Built a wave at a time, so a change to every host never holds 50,000 serialized
        // assignments at once; a shared assignment is serialized once.
        let slots: Vec<(&Slot, Option<&Arc<Assignment>>)> = w
            .put
            .iter()
            .map(|(slot, a)| (slot, Some(a)))
            .chain(w.delete.iter().map(|slot| (slot, None)))
            .collect();
        let mut last: Option<(&Arc<Assignment>, Vec<u8>)> = None;
        for wave in slots.chunks(TXN_OPS * TXN_CONCURRENCY) {
            let mut ops: Vec<(Slot, TxnOp)> = Vec::with_capacity(wave.len());
            for ((h, p), a) in wave {
                let key = self.keys.assignment(h, p);
                let op = match a {
                    None => TxnOp::delete(key, None),
                    Some(a) => {
                        if last.as_ref().is_none_or(|(prev, _)| !Arc::ptr_eq(prev, a)) {
                            match serde_json::to_vec(a.as_ref()) {
                                Ok(v) => last = Some((*a, v)),
                                Err(e) => {
                                    failures.0.insert((h.clone(), p.clone()), e.to_string());
                                    continue;
                                }
                            }
                        }
                        TxnOp::put(key, last.as_ref().map(|(_, v)| v.clone()).unwrap_or_default(), None)
                    }
                };
                ops.push(((h.clone(), p.clone()), op));
            }
            let mut writes = Vec::new();
            for chunk in ops.chunks(TXN_OPS) {
                writes.push(self.write_chunk(chunk, fence));
            }
            for r in futures_util::future::join_all(writes).await {
                failures.0.extend(r?.0);
            }
        }
        Ok(failures)
    }

    async fn write_chunk(&self, chunk: &[(Slot, TxnOp)], fence: Option<&Fence>) -> Result<WriteFailures, StoreError> {
        let mut c = self.etcd.client().await;
        let txn = |ops: Vec<TxnOp>| {
            let t = Txn::new();
            let t = match fence {
                Some(f) => t.when([Compare::create_revision(
                    f.key.clone(),
                    CompareOp::Equal,
                    f.create_revision,
                )]),
                None => t,
            };
            t.and_then(ops)
        };
        let lost = || StoreError::Conflict("this controller no longer leads (its election key changed)".into());
        let all: Vec<TxnOp> = chunk.iter().map(|(_, op)| op.clone()).collect();
        match self.within("txn", c.txn(txn(all))).await {
            Ok(r) if r.succeeded() => return Ok(WriteFailures::default()),
            Ok(_) => return Err(lost()),
            Err(StoreError::Etcd(e)) if !Etcd::is_unavailable(&e) => {
                tracing::warn!(error = %e, ops = chunk.len(), "etcd refused an assignment transaction; writing its operations one by one");
            }
            Err(e) => return Err(e),
        }
        let mut failures = WriteFailures::default();
        for (slot, op) in chunk {
            match self.within("txn", c.txn(txn(vec![op.clone()]))).await {
                Ok(r) if r.succeeded() => {}
                Ok(_) => return Err(lost()),
                Err(StoreError::Etcd(e)) if !Etcd::is_unavailable(&e) => {
                    tracing::warn!(host = %slot.0, program = %slot.1, error = %e, "etcd refused an assignment");
                    failures.0.insert(slot.clone(), e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(failures)
    }
}
