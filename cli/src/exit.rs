//! `corral`'s exit codes, the same for every command:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done; `diff`: nothing would change; `status`: everything is as declared |
//! | 1 | `diff`: something would change; `status`: something is not as declared; any other command: the controller refused something (not found, invalid, conflict), the rest was done |
//! | 2 | invalid input or usage: unreadable or invalid files, bad arguments, invalid names; nothing was sent |
//! | 3 | the controller could not be reached, it could not reach etcd (503), or its answer could not be read |

use std::process::ExitCode;

use corral_cli::client::ClientError;

pub const OK: u8 = 0;
pub const REFUSED: u8 = 1;
pub const INVALID: u8 = 2;
pub const UNREACHABLE: u8 = 3;

/// The code for a failed call to the controller.
pub fn of_client(e: &ClientError) -> u8 {
    match e {
        ClientError::Api { status: 503, .. } => UNREACHABLE,
        ClientError::Api { .. } => REFUSED,
        ClientError::Invalid(_) => INVALID,
        ClientError::Transport { .. } | ClientError::Decode(_) => UNREACHABLE,
    }
}

/// The code for an error that ended a command: the controller's, if one is in its chain,
/// else invalid input.
pub fn of_error(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|c| c.downcast_ref::<ClientError>())
        .map_or(INVALID, of_client)
}

/// The worst of several outcomes (unreachable over refused over done).
#[derive(Clone, Copy, Debug, Default)]
pub struct Worst(u8);

impl Worst {
    pub fn failed(&mut self, e: &ClientError) {
        self.0 = self.0.max(of_client(e));
    }

    /// Something was refused (not found, could not be done), the rest done.
    pub fn refused(&mut self) {
        self.0 = self.0.max(REFUSED);
    }

    pub fn code(self) -> ExitCode {
        ExitCode::from(self.0)
    }
}

pub fn code(c: u8) -> ExitCode {
    ExitCode::from(c)
}
