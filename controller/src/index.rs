//! The leader's index of the fleet: built from one paged scan at one revision, then kept
//! current by applying watch events, so that an event costs what it changes, not a re-read of
//! the fleet. Pure: keys and values in, placement decisions out.
//!
//! Assignments and reports are kept as small digests (generation, content hash, readiness),
//! not whole specs: 50,000 of them fit in a few megabytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;

use corral_proto::api::RolloutState;
use corral_proto::fleet::{Assignment, FleetStatus, NativeGroup, ProgramHostStatus, ProgramSummary};
use corral_proto::keys::Keys;
use corral_proto::resource::{Group, Host, HostControl, Program, RolloutSpec};

use crate::placement::{AssignmentWrites, RolloutDecision};
use crate::status::{fleet_of, host_readiness};

/// What etcd holds for one assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub generation: u64,
    /// A hash of the assignment's JSON: equal content, equal digest.
    pub digest: u64,
}

/// What a host last reported for one program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub generation: u64,
    pub ready: bool,
    /// The generation that failed on the host (`ProgramHostStatus::failed_generation`).
    pub failed: u64,
}

/// `(program, host)`: the index's key order, so a program's slots are one range.
pub type ProgramSlot = (String, String);

/// Which programs must be placed again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub all: bool,
    pub programs: BTreeSet<String>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.all && self.programs.is_empty()
    }
}

/// The leader's view of the fleet.
#[derive(Clone, Debug, Default)]
pub struct Index {
    pub programs: BTreeMap<String, Program>,
    pub groups: BTreeMap<String, Group>,
    /// Hosts as placement sees them: what each agent registered, with its operators' labels,
    /// cordon and drain ([`HostControl::effective`]).
    pub hosts: BTreeMap<String, Host>,
    /// What each agent registered.
    pub registered: BTreeMap<String, Host>,
    /// What operators set per host.
    pub controls: BTreeMap<String, HostControl>,
    /// Programs whose rollout is paused: no host moves to a newer generation.
    pub paused: BTreeSet<String>,
    /// What the leader recorded of each program's rollouts (last good generation, last
    /// automatic revert).
    pub rollout_states: BTreeMap<String, RolloutState>,
    /// Completions already handed to the leader, until the rollout state says so: each is
    /// recorded once, not at every report.
    pub completions_sent: BTreeMap<String, u64>,
    pub current: BTreeMap<ProgramSlot, Held>,
    pub reports: BTreeMap<ProgramSlot, Seen>,
    /// Key -> why its value cannot be read (it is left out).
    pub unreadable: BTreeMap<String, String>,
    /// Programs whose rollout holds hosts back: their hosts' reports move them on.
    pub waiting: BTreeSet<String>,
    /// Hosts whose agent holds its liveness lease.
    pub alive: BTreeSet<String>,
}

/// The generation an automatic revert of `failed` goes back to: the last that ran, ready,
/// everywhere; none when there is no such generation, when `failed` is itself a revert (a
/// revert that fails is not reverted again: the rollout stops there), or when `failed` was
/// already reverted (the revert is on its way).
pub fn revert_to(failed: u64, state: Option<&RolloutState>) -> Option<u64> {
    let state = state?;
    let good = state.last_good.filter(|g| *g < failed)?;
    match &state.reverted {
        Some(r) if r.revert_generation == failed || r.failed_generation == failed => None,
        _ => Some(good),
    }
}

/// The digest of an assignment as the controller writes it.
pub fn digest(a: &Assignment) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    serde_json::to_vec(a).unwrap_or_default().hash(&mut h);
    h.finish()
}

impl Index {
    /// Applies one key's new value (`None`: deleted) and marks what must be placed again.
    pub fn apply(&mut self, keys: &Keys, key: &str, value: Option<&[u8]>, dirty: &mut Dirty) {
        let under = |prefix: String| key.strip_prefix(prefix.as_str()).map(str::to_string);
        if let Some(name) = under(keys.programs()) {
            dirty.programs.insert(name.clone());
            self.upsert(key, value, |i| &mut i.programs, name);
        } else if let Some(name) = under(keys.groups()) {
            // Members before and after the change get their native group (or lose it).
            let before: Vec<String> = self
                .groups
                .get(&name)
                .map(|g| g.spec.programs.clone())
                .unwrap_or_default();
            self.upsert(key, value, |i| &mut i.groups, name.clone());
            let after: Vec<String> = self
                .groups
                .get(&name)
                .map(|g| g.spec.programs.clone())
                .unwrap_or_default();
            dirty.programs.extend(before.into_iter().chain(after));
        } else if let Some(name) = under(keys.hosts()) {
            self.upsert(key, value, |i| &mut i.registered, name.clone());
            self.refresh_host(&name, dirty);
        } else if let Some(name) = under(keys.program_controls()) {
            let paused = value
                .and_then(|v| serde_json::from_slice::<corral_proto::api::ProgramControl>(v).ok())
                .is_some_and(|c| c.paused);
            if paused {
                self.paused.insert(name.clone());
            } else {
                self.paused.remove(&name);
            }
            dirty.programs.insert(name);
        } else if let Some(name) = under(keys.rollout_states()) {
            self.upsert(key, value, |i| &mut i.rollout_states, name.clone());
            dirty.programs.insert(name);
        } else if let Some(name) = under(keys.host_controls()) {
            self.upsert(key, value, |i| &mut i.controls, name.clone());
            self.refresh_host(&name, dirty);
        } else if let Some(name) = under(keys.alive_prefix()) {
            // Liveness places nothing; it counts in the fleet's numbers.
            if value.is_some() {
                self.alive.insert(name);
            } else {
                self.alive.remove(&name);
            }
        } else if key.starts_with(&keys.all_assignments()) {
            let Some((h, p)) = keys.host_and_program(key) else {
                return;
            };
            let slot = (p.to_string(), h.to_string());
            match value.map(serde_json::from_slice::<Assignment>) {
                None => {
                    self.current.remove(&slot);
                    self.unreadable.remove(key);
                }
                Some(Ok(a)) => {
                    let held = Held {
                        generation: a.program.metadata.generation,
                        digest: digest(&a),
                    };
                    self.current.insert(slot, held);
                    self.unreadable.remove(key);
                }
                Some(Err(e)) => {
                    // Placed again: it will be overwritten with what it should be.
                    self.current.remove(&slot);
                    dirty.programs.insert(p.to_string());
                    self.unreadable.insert(key.to_string(), e.to_string());
                }
            }
        } else if key.starts_with(&keys.all_status()) {
            let Some((h, p)) = keys.host_and_program(key) else {
                return;
            };
            let slot = (p.to_string(), h.to_string());
            match value.map(serde_json::from_slice::<ProgramHostStatus>) {
                Some(Ok(r)) => {
                    self.reports.insert(
                        slot,
                        Seen {
                            generation: r.observed_generation,
                            ready: r.ready,
                            failed: r.failed_generation,
                        },
                    );
                    // A failure of the current generation may revert it; its completion is
                    // recorded.
                    if let Some(prog) = self.programs.get(p)
                        && (r.failed_generation == prog.metadata.generation
                            || (r.ready && r.observed_generation == prog.metadata.generation))
                        && self.rollout_states.get(p).and_then(|s| s.last_good) != Some(prog.metadata.generation)
                    {
                        dirty.programs.insert(p.to_string());
                    }
                }
                _ => {
                    self.reports.remove(&slot);
                }
            }
            if self.waiting.contains(p) {
                dirty.programs.insert(p.to_string());
            }
        }
    }

    /// Recomputes one host's effective view; placement is dirty when its labels, cordon or
    /// drain changed (its status, which changes often, places nothing).
    fn refresh_host(&mut self, name: &str, dirty: &mut Dirty) {
        let placed = |h: Option<&Host>| h.map(|h| (h.metadata.labels.clone(), h.spec.clone()));
        let before = placed(self.hosts.get(name));
        match self.registered.get(name) {
            Some(r) => {
                let h = self.controls.get(name).cloned().unwrap_or_default().effective(r);
                self.hosts.insert(name.to_string(), h);
            }
            None => {
                self.hosts.remove(name);
            }
        }
        if placed(self.hosts.get(name)) != before {
            dirty.all = true;
        }
    }

    fn upsert<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
        value: Option<&[u8]>,
        map: impl Fn(&mut Index) -> &mut BTreeMap<String, T>,
        name: String,
    ) {
        match value.map(serde_json::from_slice::<T>) {
            None => {
                map(self).remove(&name);
                self.unreadable.remove(key);
            }
            Some(Ok(v)) => {
                map(self).insert(name, v);
                self.unreadable.remove(key);
            }
            Some(Err(e)) => {
                map(self).remove(&name);
                self.unreadable.insert(key.to_string(), e.to_string());
            }
        }
    }

    /// The native group `program` belongs to, if any (the first by name: the API refuses a
    /// program in two).
    fn native_of(&self, program: &str) -> Option<NativeGroup> {
        self.groups
            .values()
            .find(|g| g.spec.native && g.spec.programs.iter().any(|m| m == program))
            .map(|g| NativeGroup {
                name: g.metadata.name.clone(),
                priority: g.spec.priority,
            })
    }

    /// The writes that bring one program's assignments where they should be, paced by its
    /// rollout: new hosts and content changes within a generation at once; a new generation
    /// to at most `max_unavailable` hosts that have not reported it ready yet (in host name
    /// order); hosts the program no longer selects lose it. Returns whether hosts are still
    /// held back.
    pub fn plan_program(&mut self, name: &str, out: &mut AssignmentWrites) -> bool {
        let range = (name.to_string(), String::new())..;
        let current: Vec<(&String, &Held)> = self
            .current
            .range(range)
            .take_while(|((p, _), _)| p == name)
            .map(|((_, h), held)| (h, held))
            .collect();
        let Some(p) = self.programs.get(name) else {
            out.delete
                .extend(current.into_iter().map(|(h, _)| (h.clone(), name.to_string())));
            return false;
        };
        let mut program = p.clone();
        program.status = None;
        program.metadata.resource_version = None;
        let assignment = Arc::new(Assignment {
            program,
            native_group: self.native_of(name),
        });
        let want = Held {
            generation: p.metadata.generation,
            digest: digest(&assignment),
        };
        let held: BTreeMap<&String, &Held> = current.iter().copied().collect();
        // A drained host runs nothing; a cordoned one keeps (and updates) what it has, and
        // gets nothing new.
        let selected: Vec<&String> = self
            .hosts
            .values()
            .filter(|h| p.placed_on(h, held.contains_key(&h.metadata.name)))
            .map(|h| &h.metadata.name)
            .collect();
        let mut behind = Vec::new();
        let mut in_flight = 0;
        let mut written = false;
        let mut failing: Option<&String> = None;
        for h in &selected {
            match held.get(*h) {
                None => {
                    written = true;
                    out.put.push((((*h).clone(), name.to_string()), assignment.clone()));
                }
                Some(cur) if cur.generation < want.generation => behind.push(*h),
                Some(cur) if **cur != want => {
                    written = true;
                    out.put.push((((*h).clone(), name.to_string()), assignment.clone()));
                }
                Some(_) => {
                    let seen = self.reports.get(&(name.to_string(), (*h).clone()));
                    let ready = seen.is_some_and(|r| r.generation >= want.generation && r.ready);
                    in_flight += usize::from(!ready);
                    if seen.is_some_and(|r| r.failed == want.generation) {
                        failing = failing.or(Some(*h));
                    }
                }
            }
        }
        let state = self.rollout_states.get(name);
        // Complete: every host that is up runs it, ready (a host that is down, as some always
        // are in a large fleet, does not hold back what an automatic revert goes back to).
        let up: Vec<&String> = selected.iter().copied().filter(|h| self.alive.contains(*h)).collect();
        let complete = !written
            && !up.is_empty()
            && up.iter().all(|h| {
                held.get(*h).is_some_and(|c| **c == want)
                    && self
                        .reports
                        .get(&(name.to_string(), (*h).clone()))
                        .is_some_and(|r| r.generation >= want.generation && r.ready)
            });
        if complete {
            if state.and_then(|s| s.last_good) < Some(want.generation)
                && self.completions_sent.get(name) != Some(&want.generation)
            {
                self.completions_sent.insert(name.to_string(), want.generation);
                out.rollouts.push(RolloutDecision::Completed {
                    program: name.to_string(),
                    generation: want.generation,
                });
            }
        } else if let Some(host) = failing
            && p.spec.rollout.as_ref().and_then(|r| r.auto_revert) == Some(true)
            && let Some(to) = revert_to(want.generation, state)
        {
            out.rollouts.push(RolloutDecision::Revert {
                program: name.to_string(),
                failed: want.generation,
                to,
                host: host.clone(),
            });
            // Nothing more of the failed generation goes out meanwhile.
            return false;
        }
        let max = RolloutSpec::max_unavailable(p.spec.rollout.as_ref(), selected.len());
        // Paused: hosts that run an older generation stay on it.
        let go = if self.paused.contains(name) {
            0
        } else {
            max.saturating_sub(in_flight).min(behind.len())
        };
        for h in &behind[..go] {
            out.put.push((((*h).clone(), name.to_string()), assignment.clone()));
        }
        let selected: BTreeSet<&String> = selected.into_iter().collect();
        for (h, _) in current {
            if !selected.contains(h) {
                out.delete.push((h.clone(), name.to_string()));
            }
        }
        go < behind.len()
    }

    /// Plans every dirty program (every program, and every program with assignments, when
    /// `dirty.all`); updates `waiting`.
    pub fn plan(&mut self, dirty: &Dirty) -> AssignmentWrites {
        let names: BTreeSet<String> = if dirty.all {
            self.programs
                .keys()
                .cloned()
                .chain(self.current.keys().map(|(p, _)| p.clone()))
                .collect()
        } else {
            dirty.programs.clone()
        };
        let mut out = AssignmentWrites::default();
        for name in names {
            if self.plan_program(&name, &mut out) {
                self.waiting.insert(name);
            } else {
                self.waiting.remove(&name);
            }
        }
        out
    }

    /// Takes written assignments into account at once (their watch events confirm them).
    pub fn written(&mut self, writes: &AssignmentWrites, failed: &BTreeSet<(String, String)>) {
        // One digest per shared assignment, not one per host.
        let mut held: HashMap<*const Assignment, Held> = HashMap::new();
        for ((h, p), a) in &writes.put {
            if !failed.contains(&(h.clone(), p.clone())) {
                let held = *held.entry(Arc::as_ptr(a)).or_insert_with(|| Held {
                    generation: a.program.metadata.generation,
                    digest: digest(a),
                });
                self.current.insert((p.clone(), h.clone()), held);
            }
        }
        for (h, p) in &writes.delete {
            if !failed.contains(&(h.clone(), p.clone())) {
                self.current.remove(&(p.clone(), h.clone()));
            }
        }
    }

    /// The fleet's numbers as the metrics show them (hosts by readiness; per program the
    /// hosts assigned, updated and ready; the control plane's problems), and the registered
    /// hosts, from the index alone: a scrape reads nothing from etcd.
    pub fn numbers(&self, problems: Vec<String>) -> (FleetStatus, BTreeSet<String>) {
        let hosts: Vec<Host> = self.hosts.values().cloned().collect();
        let readiness = host_readiness(&hosts, &self.alive);
        let ready_host = |h: &str| matches!(readiness.get(h), Some(None));
        let programs = self
            .programs
            .values()
            .map(|p| {
                let name = &p.metadata.name;
                let mut summary = ProgramSummary {
                    name: name.clone(),
                    generation: p.metadata.generation,
                    paused: self.paused.contains(name),
                    ..Default::default()
                };
                for h in self.hosts.values() {
                    let slot = (name.clone(), h.metadata.name.clone());
                    if !p.placed_on(h, self.current.contains_key(&slot)) {
                        continue;
                    }
                    let seen = self.reports.get(&slot);
                    let updated = seen.is_some_and(|s| s.generation >= p.metadata.generation);
                    summary.desired += 1;
                    summary.updated += usize::from(updated);
                    summary.ready +=
                        usize::from(updated && seen.is_some_and(|s| s.ready) && ready_host(&h.metadata.name));
                }
                summary
            })
            .collect();
        let mut status = fleet_of(&readiness, programs);
        status.control_plane = problems;
        (status, self.hosts.keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::resource::{Metadata, ProgramSpec};

    fn keys() -> Keys {
        Keys::default()
    }

    fn program(name: &str, generation: u64, selector: &[(&str, &str)]) -> Program {
        let mut p = Program::new(
            Metadata {
                name: name.into(),
                generation,
                ..Default::default()
            },
            ProgramSpec {
                command: "/bin/true".into(),
                selector: Some(selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
        );
        p.metadata.generation = generation;
        p
    }

    fn host(name: &str, labels: &[(&str, &str)]) -> Host {
        Host::new(
            Metadata {
                name: name.into(),
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            },
            Default::default(),
        )
    }

    fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).expect("serializes")
    }

    fn put(i: &mut Index, key: String, value: Vec<u8>) -> Dirty {
        let mut d = Dirty::default();
        i.apply(&keys(), &key, Some(&value), &mut d);
        d
    }

    fn hosts_of(w: &AssignmentWrites) -> Vec<String> {
        w.put.iter().map(|((h, _), _)| h.clone()).collect()
    }

    /// An index with `n` hosts labelled role=app running generation 1 of `p`, all ready.
    fn fleet(n: usize) -> Index {
        let mut i = Index::default();
        for h in 0..n {
            put(
                &mut i,
                keys().host(&format!("h{h:02}")),
                json(&host(&format!("h{h:02}"), &[("role", "app")])),
            );
            put(&mut i, keys().alive(&format!("h{h:02}")), Vec::new());
        }
        put(&mut i, keys().program("p"), json(&program("p", 1, &[("role", "app")])));
        let w = i.plan(&Dirty {
            all: true,
            ..Default::default()
        });
        assert_eq!(w.put.len(), n);
        for ((h, p), a) in &w.put {
            put(&mut i, keys().assignment(h, p), json(a.as_ref()));
            let report = status(h, 1, true, 0);
            put(&mut i, keys().status(h, p), json(&report));
        }
        i
    }

    #[test]
    fn a_cordoned_host_gets_nothing_new_keeps_and_updates_what_it_has_and_a_drained_one_runs_nothing() {
        let mut i = fleet(2);
        let control = |c: HostControl| json(&c);
        let d = put(
            &mut i,
            keys().host_control("h01"),
            control(HostControl {
                cordoned: true,
                ..Default::default()
            }),
        );
        assert!(d.all, "a cordon is placement's business");
        assert!(i.hosts["h01"].spec.cordoned);
        // A new program: only the uncordoned host.
        put(&mut i, keys().program("q"), json(&program("q", 1, &[("role", "app")])));
        let w = i.plan(&Dirty {
            all: true,
            ..Default::default()
        });
        assert_eq!(hosts_of(&w), ["h00"]);
        assert!(
            w.delete.is_empty(),
            "what runs on a cordoned host stays: {:?}",
            w.delete
        );
        // A new generation of what it runs still reaches it (paced by the rollout).
        put(&mut i, keys().program("p"), json(&program("p", 2, &[("role", "app")])));
        let w = i.plan(&Dirty {
            programs: ["p".to_string()].into(),
            ..Default::default()
        });
        assert!(hosts_of(&w).contains(&"h00".to_string()) || hosts_of(&w).contains(&"h01".to_string()));
        let mut both = hosts_of(&w);
        for ((h, p), a) in &w.put {
            put(&mut i, keys().assignment(h, p), json(a.as_ref()));
            let report = status(h, 2, true, 0);
            put(&mut i, keys().status(h, p), json(&report));
        }
        both.extend(hosts_of(&i.plan(&Dirty {
            programs: ["p".to_string()].into(),
            ..Default::default()
        })));
        both.sort();
        assert_eq!(both, ["h00", "h01"]);
        // Drained: everything taken off.
        put(
            &mut i,
            keys().host_control("h01"),
            control(HostControl {
                cordoned: true,
                drained: true,
                ..Default::default()
            }),
        );
        let w = i.plan(&Dirty {
            all: true,
            ..Default::default()
        });
        assert_eq!(w.delete, [("h01".to_string(), "p".to_string())]);
        // An operator's label places a program; the agent re-registering does not undo it.
        let d = put(
            &mut i,
            keys().host_control("h00"),
            control(HostControl {
                labels: [("tier".to_string(), "gold".to_string())].into(),
                ..Default::default()
            }),
        );
        assert!(d.all);
        put(&mut i, keys().host("h00"), json(&host("h00", &[("role", "app")])));
        assert_eq!(
            i.hosts["h00"].metadata.labels.get("tier").map(String::as_str),
            Some("gold")
        );
        put(&mut i, keys().program("g"), json(&program("g", 1, &[("tier", "gold")])));
        let w = i.plan(&Dirty {
            programs: ["g".to_string()].into(),
            ..Default::default()
        });
        assert_eq!(hosts_of(&w), ["h00"]);
        // Uncordoned (the control removed): h01 runs p again.
        let mut d = Dirty::default();
        i.apply(&keys(), &keys().host_control("h01"), None, &mut d);
        assert!(d.all && !i.hosts["h01"].spec.cordoned);
        let mut d = Dirty::default();
        i.apply(&keys(), &keys().assignment("h01", "p"), None, &mut d);
        let w = i.plan(&Dirty {
            programs: ["p".to_string()].into(),
            ..Default::default()
        });
        assert_eq!(hosts_of(&w), ["h01"]);
    }

    #[test]
    fn the_fleets_numbers_come_from_the_index() {
        let mut i = fleet(3);
        for h in ["h00", "h01", "h02"] {
            put(&mut i, keys().alive(h), Vec::new());
        }
        let (s, hosts) = i.numbers(vec![]);
        assert_eq!((s.hosts, s.hosts_ready), (3, 3));
        assert_eq!(hosts.len(), 3);
        let p = &s.programs[0];
        assert_eq!((p.desired, p.updated, p.ready), (3, 3, 3));

        // A silent agent, a new generation reported by one host, a report not ready.
        let mut d = Dirty::default();
        i.apply(&keys(), &keys().alive("h02"), None, &mut d);
        assert!(d.is_empty(), "liveness places nothing");
        put(&mut i, keys().program("p"), json(&program("p", 2, &[("role", "app")])));
        report(&mut i, "h00", 2, true);
        report(&mut i, "h01", 2, false);
        let (s, _) = i.numbers(vec!["etcd refused something".into()]);
        assert_eq!((s.hosts, s.hosts_ready), (3, 2));
        assert_eq!(s.not_ready_hosts, vec!["h02".to_string()]);
        let p = &s.programs[0];
        assert_eq!((p.generation, p.desired, p.updated, p.ready), (2, 3, 2, 1));
        assert_eq!(s.control_plane.len(), 1);
    }

    #[test]
    fn events_mark_only_what_they_change() {
        let mut i = fleet(3);
        assert!(
            i.plan(&Dirty {
                all: true,
                ..Default::default()
            })
            .put
            .is_empty(),
            "nothing to do when in line"
        );
        // A report while no rollout waits: nothing to place.
        let d = put(&mut i, keys().status("h00", "p"), b"{}".to_vec());
        assert!(d.is_empty());
        // A host's status (not its labels) changes nothing.
        let mut h = host("h00", &[("role", "app")]);
        h.status = Some(Default::default());
        assert!(put(&mut i, keys().host("h00"), json(&h)).is_empty());
        // Its labels do.
        assert!(put(&mut i, keys().host("h00"), json(&host("h00", &[("role", "db")]))).all);
        let d = put(&mut i, keys().program("q"), json(&program("q", 1, &[])));
        assert_eq!(d.programs, ["q".to_string()].into());
        // An unreadable value is recorded and left out.
        let d = put(&mut i, keys().program("bad"), b"{not json".to_vec());
        assert!(i.unreadable.contains_key(&keys().program("bad")) && !i.programs.contains_key("bad"));
        assert_eq!(d.programs, ["bad".to_string()].into());
    }

    #[test]
    fn a_new_generation_rolls_out_a_quarter_at_a_time_and_waits_for_reports() {
        let mut i = fleet(8);
        put(&mut i, keys().program("p"), json(&program("p", 2, &[("role", "app")])));
        let w = i.plan(&Dirty {
            programs: ["p".to_string()].into(),
            ..Default::default()
        });
        assert_eq!(hosts_of(&w), ["h00", "h01"], "25% of 8");
        assert!(i.waiting.contains("p"));
        i.written(&w, &BTreeSet::new());
        // Nothing more until they report generation 2 ready.
        assert!(
            i.plan(&Dirty {
                programs: ["p".to_string()].into(),
                ..Default::default()
            })
            .put
            .is_empty()
        );
        for h in ["h00", "h01"] {
            let report = status(h, 2, true, 0);
            let d = put(&mut i, keys().status(h, "p"), json(&report));
            assert_eq!(
                d.programs,
                ["p".to_string()].into(),
                "a report moves a waiting rollout on"
            );
        }
        let w = i.plan(&Dirty {
            programs: ["p".to_string()].into(),
            ..Default::default()
        });
        assert_eq!(hosts_of(&w), ["h02", "h03"]);
    }

    /// A report of program p from host `h`.
    fn status(h: &str, generation: u64, ready: bool, failed_generation: u64) -> ProgramHostStatus {
        ProgramHostStatus {
            host: h.into(),
            program: "p".into(),
            observed_generation: generation,
            ready,
            failed_generation,
            ..Default::default()
        }
    }

    fn report(i: &mut Index, h: &str, generation: u64, ready: bool) -> Dirty {
        put(i, keys().status(h, "p"), json(&status(h, generation, ready, 0)))
    }

    fn only_p() -> Dirty {
        Dirty {
            programs: ["p".to_string()].into(),
            ..Default::default()
        }
    }

    fn failed_report(i: &mut Index, h: &str, generation: u64) -> Dirty {
        put(
            i,
            keys().status(h, "p"),
            json(&status(h, generation, false, generation)),
        )
    }

    #[test]
    fn a_completed_rollout_is_recorded_and_a_failed_one_reverted_once_with_auto_revert() {
        let mut i = fleet(4);
        // Generation 1 runs, ready, everywhere: recorded once.
        let w = i.plan(&only_p());
        assert_eq!(
            w.rollouts,
            [RolloutDecision::Completed {
                program: "p".into(),
                generation: 1
            }]
        );
        assert!(
            i.plan(&only_p()).rollouts.is_empty(),
            "handed to the leader once, not at every report while it records it"
        );
        let good = RolloutState {
            last_good: Some(1),
            reverted: None,
        };
        let d = put(&mut i, keys().rollout_state("p"), json(&good));
        assert!(d.programs.contains("p"));
        assert!(i.plan(&only_p()).rollouts.is_empty(), "recorded: not again");
        // A host that is down does not hold back a completion.
        let mut down = fleet(3);
        let mut d = Dirty::default();
        down.apply(&keys(), &keys().alive("h02"), None, &mut d);
        put(
            &mut down,
            keys().program("p"),
            json(&program("p", 2, &[("role", "app")])),
        );
        let mut completed = false;
        for _ in 0..5 {
            let w = down.plan(&only_p());
            completed |= w.rollouts.contains(&RolloutDecision::Completed {
                program: "p".into(),
                generation: 2,
            });
            down.written(&w, &BTreeSet::new());
            for ((h, _), _) in &w.put {
                if h != "h02" {
                    report(&mut down, h, 2, true);
                }
            }
        }
        assert!(
            completed,
            "h02 is down: generation 2 runs ready on every host that is up"
        );

        // Generation 2, one host at a time, reverting on failure.
        let mut p2 = program("p", 2, &[("role", "app")]);
        p2.spec.rollout = Some(RolloutSpec {
            max_unavailable: Some(corral_proto::HostCount::Count(1)),
            auto_revert: Some(true),
        });
        put(&mut i, keys().program("p"), json(&p2));
        let w = i.plan(&only_p());
        assert_eq!(hosts_of(&w), ["h00"]);
        i.written(&w, &BTreeSet::new());
        // Not ready yet is not a failure.
        report(&mut i, "h00", 2, false);
        assert!(i.plan(&only_p()).rollouts.is_empty());
        let d = failed_report(&mut i, "h00", 2);
        assert!(
            d.programs.contains("p"),
            "a failure of the current generation is looked at"
        );
        let w = i.plan(&only_p());
        assert!(w.put.is_empty(), "nothing more of a failed generation goes out");
        assert_eq!(
            w.rollouts,
            [RolloutDecision::Revert {
                program: "p".into(),
                failed: 2,
                to: 1,
                host: "h00".into()
            }]
        );
        // Once the revert is recorded (and while it is on its way), not again.
        let reverted = RolloutState {
            last_good: Some(1),
            reverted: Some(corral_proto::api::AutoRevert {
                failed_generation: 2,
                host: "h00".into(),
                to_generation: 1,
                revert_generation: 3,
                at: String::new(),
                not_reverted: None,
            }),
        };
        put(&mut i, keys().rollout_state("p"), json(&reverted));
        assert!(i.plan(&only_p()).rollouts.is_empty());
        // The revert (generation 3) failing too is not reverted again.
        let mut p3 = p2.clone();
        p3.metadata.generation = 3;
        put(&mut i, keys().program("p"), json(&p3));
        let w = i.plan(&only_p());
        i.written(&w, &BTreeSet::new());
        failed_report(&mut i, "h00", 3);
        assert!(i.plan(&only_p()).rollouts.is_empty());
    }

    #[test]
    fn without_auto_revert_a_failure_only_stops_the_rollout() {
        let mut i = fleet(2);
        put(
            &mut i,
            keys().rollout_state("p"),
            json(&RolloutState {
                last_good: Some(1),
                reverted: None,
            }),
        );
        put(&mut i, keys().program("p"), json(&program("p", 2, &[("role", "app")])));
        let w = i.plan(&only_p());
        i.written(&w, &BTreeSet::new());
        failed_report(&mut i, "h00", 2);
        let w = i.plan(&only_p());
        assert!(w.rollouts.is_empty() && w.put.is_empty(), "{w:?}");
    }

    #[test]
    fn a_revert_goes_back_only_to_an_older_good_generation_and_never_twice() {
        let state = |good: Option<u64>, reverted: Option<(u64, u64)>| RolloutState {
            last_good: good,
            reverted: reverted.map(|(f, r)| corral_proto::api::AutoRevert {
                failed_generation: f,
                revert_generation: r,
                ..Default::default()
            }),
        };
        assert_eq!(revert_to(5, None), None, "nothing ever completed");
        assert_eq!(revert_to(5, Some(&state(None, None))), None);
        assert_eq!(revert_to(5, Some(&state(Some(4), None))), Some(4));
        assert_eq!(
            revert_to(5, Some(&state(Some(5), None))),
            None,
            "5 itself was good once"
        );
        assert_eq!(
            revert_to(5, Some(&state(Some(3), Some((5, 6))))),
            None,
            "already reverted"
        );
        assert_eq!(
            revert_to(6, Some(&state(Some(3), Some((5, 6))))),
            None,
            "a revert is not reverted"
        );
        assert_eq!(revert_to(8, Some(&state(Some(7), Some((5, 6))))), Some(7));
    }

    #[test]
    fn a_failing_batch_pauses_the_rollout_and_the_others_keep_the_old_version() {
        let mut i = fleet(3);
        let mut p2 = program("p", 2, &[("role", "app")]);
        p2.spec.rollout = Some(RolloutSpec {
            max_unavailable: Some(corral_proto::HostCount::Count(1)),
            auto_revert: None,
        });
        put(&mut i, keys().program("p"), json(&p2));
        let w = i.plan(&only_p());
        assert_eq!(hosts_of(&w), ["h00"]);
        i.written(&w, &BTreeSet::new());
        report(&mut i, "h00", 2, true);
        let w = i.plan(&only_p());
        assert_eq!(hosts_of(&w), ["h01"]);
        i.written(&w, &BTreeSet::new());
        // h01 runs 2 but never gets ready: nothing more moves, however often it is asked.
        report(&mut i, "h01", 2, false);
        for _ in 0..3 {
            assert!(i.plan(&only_p()).put.is_empty());
        }
        assert!(i.waiting.contains("p"));
        assert_eq!(i.current[&("p".to_string(), "h02".to_string())].generation, 1);
    }

    #[test]
    fn max_unavailable_is_a_count_or_a_share_of_the_programs_hosts_default_a_quarter() {
        use corral_proto::HostCount::*;
        let moved = |max: Option<corral_proto::HostCount>| {
            let mut i = fleet(10);
            let mut p2 = program("p", 2, &[("role", "app")]);
            p2.spec.rollout = max.map(|m| RolloutSpec {
                max_unavailable: Some(m),
                auto_revert: None,
            });
            put(&mut i, keys().program("p"), json(&p2));
            i.plan(&only_p()).put.len()
        };
        assert_eq!(moved(None), 3, "default 25% of 10, rounded up");
        assert_eq!(moved(Some(Percent(100))), 10);
        assert_eq!(moved(Some(Percent(1))), 1);
        assert_eq!(moved(Some(Count(4))), 4);
        assert_eq!(RolloutSpec::max_unavailable(None, 1000), 250);
        let spec: RolloutSpec = serde_json::from_str(r#"{"max_unavailable": "30%"}"#).expect("parses");
        assert_eq!(spec.max_unavailable, Some(Percent(30)));
        let spec: RolloutSpec = serde_json::from_str(r#"{"max_unavailable": 7}"#).expect("parses");
        assert_eq!(spec.max_unavailable, Some(Count(7)));
        assert!(serde_json::from_str::<RolloutSpec>(r#"{"max_unavailable": "lots"}"#).is_err());
    }

    #[test]
    fn new_hosts_are_not_held_back_by_a_rollout() {
        let mut i = fleet(4);
        put(&mut i, keys().program("p"), json(&program("p", 2, &[("role", "app")])));
        put(&mut i, keys().host("new"), json(&host("new", &[("role", "app")])));
        let w = i.plan(&Dirty {
            all: true,
            ..Default::default()
        });
        // The new host at once; of the five, 25% (two) of the others.
        assert_eq!(hosts_of(&w), ["new", "h00", "h01"]);
    }

    #[test]
    fn a_deleted_program_or_a_host_no_longer_selected_loses_its_assignments() {
        let mut i = fleet(2);
        put(&mut i, keys().host("h01"), json(&host("h01", &[("role", "db")])));
        let w = i.plan(&Dirty {
            all: true,
            ..Default::default()
        });
        assert_eq!(w.delete, [("h01".to_string(), "p".to_string())]);
        i.written(&w, &BTreeSet::new());
        let mut d = Dirty::default();
        i.apply(&keys(), &keys().program("p"), None, &mut d);
        let w = i.plan(&d);
        assert_eq!(w.delete, [("h00".to_string(), "p".to_string())]);
    }
}
