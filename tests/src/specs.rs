//! Spec builders shared by the tests: a program every host runs (`/bin/sleep 1000`,
//! startsecs 0), changed by a closure.

use std::collections::BTreeMap;

use corral_proto::fleet::Assignment;
use corral_proto::resource::{Metadata, Program, ProgramSpec, Resource};

/// A Program resource named `name`; `f` adjusts its spec.
pub fn program(name: &str, f: impl FnOnce(&mut ProgramSpec)) -> Resource {
    Resource::Program(program_object(name, f))
}

/// The same, as a `Program`.
pub fn program_object(name: &str, f: impl FnOnce(&mut ProgramSpec)) -> Program {
    let mut spec = ProgramSpec {
        command: "/bin/sleep 1000".into(),
        selector: Some(BTreeMap::new()),
        startsecs: Some(0),
        ..Default::default()
    };
    f(&mut spec);
    Program::new(
        Metadata {
            name: name.into(),
            ..Default::default()
        },
        spec,
    )
}

/// The same, at `generation`, as a host's assignment (no native group).
pub fn assignment(name: &str, generation: u64, f: impl FnOnce(&mut ProgramSpec)) -> Assignment {
    let mut program = program_object(name, f);
    program.metadata.generation = generation;
    Assignment {
        program,
        native_group: None,
    }
}
