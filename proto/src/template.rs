//! supervisord's `%` expansion: the Python `value % expansions` that supervisord applies to
//! nearly every option, parsed so that validation can refuse what would fail on the host and
//! tests can compute what supervisord will make of a value.
//!
//! Only the forms that configs really use are accepted: `%%`, `%(name)s` and, for the numeric
//! names, `%(name)d` with an optional `-`/`0` flag and a width (`%(process_num)02d`). Anything
//! else Python would either reject at parse time (a bare `%`) or turn into something surprising
//! (`%s` with a mapping prints the whole mapping), so Corral refuses it.

use std::collections::BTreeMap;

/// One piece of a parsed value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Text copied as it is.
    Literal(&'a str),
    /// `%%`, which expands to one `%`.
    Percent,
    /// `%(name)[flags][width]conv`.
    Var(Var<'a>),
}

/// A `%(name)...` reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Var<'a> {
    pub name: &'a str,
    pub left_align: bool,
    pub zero_pad: bool,
    pub width: usize,
    pub conversion: Conversion,
}

/// The conversion character of a reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// `s`: the value as text.
    Str,
    /// `d` (or `i`): a decimal integer; only for numeric names.
    Int,
}

/// Which names supervisord offers when it expands a given option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Options read once per program (`user`, `serverurl`): `here`, `program_name`,
    /// `host_node_name`, `group_name` and supervisord's own `ENV_*`.
    Program,
    /// Options read per process (`command`, `directory`, logfiles, `environment`): the
    /// program names plus `process_num` and `numprocs`.
    Process,
    /// `process_name`: like [`Scope::Process`] but without `ENV_*`, so that process names do
    /// not depend on the host's environment.
    ProcessName,
}

const STRING_NAMES: &[&str] = &["here", "program_name", "host_node_name", "group_name"];
const NUMBER_NAMES: &[&str] = &["process_num", "numprocs"];

impl Scope {
    /// Whether `name` may be referenced here, and whether it is numeric.
    fn lookup(self, name: &str) -> Result<bool, String> {
        if STRING_NAMES.contains(&name) {
            return Ok(false);
        }
        if NUMBER_NAMES.contains(&name) {
            return match self {
                Scope::Program => Err(format!(
                    "%({name}) is not available in this option (supervisord reads it once per program)"
                )),
                Scope::Process | Scope::ProcessName => Ok(true),
            };
        }
        if let Some(var) = name.strip_prefix("ENV_") {
            if self == Scope::ProcessName {
                return Err(format!(
                    "%({name}) is not allowed in process_name: process names must not depend on the host's environment"
                ));
            }
            if is_env_key(var) {
                return Ok(false);
            }
        }
        Err(format!(
            "%({name}) is not a name supervisord expands (use one of here, program_name, host_node_name, group_name, process_num, numprocs, ENV_<VAR>; write %% for a literal %)"
        ))
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: an environment variable name that survives supervisord's quoting.
pub fn is_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `value` into pieces, checking every reference against `scope`.
///
/// # Errors
/// A message saying what is wrong with the first bad `%` found.
pub fn parse(value: &str, scope: Scope) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = value;
    while let Some(pos) = rest.find('%') {
        if pos > 0 {
            pieces.push(Piece::Literal(&rest[..pos]));
        }
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('%') {
            pieces.push(Piece::Percent);
            rest = tail;
            continue;
        }
        let Some(inner) = after.strip_prefix('(') else {
            return Err(
                "contains a bare '%' (write %% for a literal percent sign, or %(name)s for an expansion)".to_string(),
            );
        };
        let Some(close) = inner.find(')') else {
            return Err("contains '%(' without a closing ')'".to_string());
        };
        let name = &inner[..close];
        let numeric = scope.lookup(name)?;
        let mut spec = inner[close + 1..].char_indices().peekable();
        let (mut left_align, mut zero_pad) = (false, false);
        while let Some(&(_, c)) = spec.peek() {
            match c {
                '-' => left_align = true,
                '0' => zero_pad = true,
                _ => break,
            }
            spec.next();
        }
        let mut width = 0usize;
        while let Some(&(_, c)) = spec.peek() {
            let Some(d) = c.to_digit(10) else { break };
            width = width * 10 + d as usize;
            if width > 64 {
                return Err(format!("%({name}) has a field width above 64"));
            }
            spec.next();
        }
        let Some((idx, conv)) = spec.next() else {
            return Err(format!("%({name}) is missing its conversion (write %({name})s)"));
        };
        let conversion = match conv {
            's' => Conversion::Str,
            'd' | 'i' if numeric => Conversion::Int,
            'd' | 'i' => {
                return Err(format!(
                    "%({name}){conv} needs a number but {name} is text (use %({name})s)"
                ));
            }
            other => {
                return Err(format!(
                    "%({name}) uses conversion '{other}', which Corral does not accept (use s, or d for process_num/numprocs)"
                ));
            }
        };
        pieces.push(Piece::Var(Var {
            name,
            left_align,
            zero_pad,
            width,
            conversion,
        }));
        rest = &inner[close + 1 + idx + conv.len_utf8()..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(rest));
    }
    Ok(pieces)
}

/// The names supervisord offers for one process of one program on one host.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub here: String,
    pub program_name: String,
    pub host_node_name: String,
    pub group_name: String,
    pub process_num: u32,
    pub numprocs: u32,
    /// `ENV_*` values, keyed without the prefix.
    pub env: BTreeMap<String, String>,
}

impl Context {
    fn text(&self, name: &str) -> Option<String> {
        Some(match name {
            "here" => self.here.clone(),
            "program_name" => self.program_name.clone(),
            "host_node_name" => self.host_node_name.clone(),
            "group_name" => self.group_name.clone(),
            "process_num" => self.process_num.to_string(),
            "numprocs" => self.numprocs.to_string(),
            other => self.env.get(other.strip_prefix("ENV_")?)?.clone(),
        })
    }
}

/// Expands `value` the way supervisord does (Python's `value % expansions`).
///
/// # Errors
/// The parse error, or the name of an `ENV_*` reference that `ctx` does not define.
pub fn expand(value: &str, scope: Scope, ctx: &Context) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    for piece in parse(value, scope)? {
        match piece {
            Piece::Literal(s) => out.push_str(s),
            Piece::Percent => out.push('%'),
            Piece::Var(var) => {
                let text = ctx
                    .text(var.name)
                    .ok_or_else(|| format!("%({}) is not defined here", var.name))?;
                out.push_str(&var.format(&text));
            }
        }
    }
    Ok(out)
}

/// The names Corral expands itself when it gives each process its own supervisord program.
const PINNED: &[&str] = &["program_name", "group_name", "process_num", "numprocs"];

/// Expands only `program_name`, `group_name`, `process_num` and `numprocs` from `ctx`, and
/// leaves `%%` and every other reference (`here`, `host_node_name`, `ENV_*`) in supervisord's
/// syntax for supervisord to expand: the value, written in a section of its own, means to
/// supervisord what `value` meant in the program's section.
///
/// # Errors
/// What [`parse`] finds wrong.
pub fn pin(value: &str, scope: Scope, ctx: &Context) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    for piece in parse(value, scope)? {
        match piece {
            Piece::Literal(s) => out.push_str(s),
            Piece::Percent => out.push_str("%%"),
            Piece::Var(var) if PINNED.contains(&var.name) => {
                let text = ctx
                    .text(var.name)
                    .ok_or_else(|| format!("%({}) is not defined here", var.name))?;
                out.push_str(&escape_percent(&var.format(&text)));
            }
            Piece::Var(var) => {
                out.push_str("%(");
                out.push_str(var.name);
                out.push(')');
                if var.left_align {
                    out.push('-');
                }
                if var.zero_pad {
                    out.push('0');
                }
                if var.width > 0 {
                    out.push_str(&var.width.to_string());
                }
                out.push(match var.conversion {
                    Conversion::Str => 's',
                    Conversion::Int => 'd',
                });
            }
        }
    }
    Ok(out)
}

impl Var<'_> {
    /// `text` padded as the reference asks (`%(process_num)02d` of 7 is `07`).
    fn format(&self, text: &str) -> String {
        let pad = self.width.saturating_sub(text.chars().count());
        let fill = if self.zero_pad && !self.left_align && self.conversion == Conversion::Int {
            '0'
        } else {
            ' '
        };
        let mut out = String::with_capacity(text.len() + pad);
        if self.left_align {
            out.push_str(text);
            out.extend(std::iter::repeat_n(' ', pad));
        } else {
            out.extend(std::iter::repeat_n(fill, pad));
            out.push_str(text);
        }
        out
    }
}

pub fn mentions_process_num(value: &str) -> bool {
    value.contains("%(process_num)")
}

/// Writes `value` with every `%` doubled, so that supervisord's expansion gives it back.
pub fn escape_percent(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == '%' {
            out.push_str("%%");
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            here: "/etc/supervisor/conf.d".into(),
            program_name: "web".into(),
            host_node_name: "h1".into(),
            group_name: "web".into(),
            process_num: 7,
            numprocs: 12,
            env: [("HOME".to_string(), "/root".to_string())].into(),
        }
    }

    #[track_caller]
    fn check(input: &str, scope: Scope, expect: Result<&str, &str>) {
        let got = expand(input, scope, &ctx());
        match (got, expect) {
            (Ok(g), Ok(e)) => assert_eq!(g, e, "{input:?}"),
            (Err(g), Err(e)) => assert!(g.contains(e), "{input:?}: error {g:?} lacks {e:?}"),
            (g, e) => panic!("{input:?}: got {g:?}, expected {e:?}"),
        }
    }

    #[test]
    fn pin_expands_corrals_names_and_leaves_supervisords_own() {
        let c = ctx();
        let pin = |v| pin(v, Scope::Process, &c).expect("pins");
        assert_eq!(
            pin("%(program_name)s-%(process_num)03d of %(numprocs)d"),
            "web-007 of 12"
        );
        assert_eq!(pin("%(group_name)s:%(process_num)-3d|"), "web:7  |");
        // What only supervisord knows stays for it, with its format.
        assert_eq!(
            pin("%(here)s/%(host_node_name)s %(ENV_HOME)s"),
            "%(here)s/%(host_node_name)s %(ENV_HOME)s"
        );
        assert_eq!(pin("100%% %(ENV_X)-05s"), "100%% %(ENV_X)-05s");
        // Pinning then letting supervisord expand gives what supervisord alone would.
        for v in [
            "%(program_name)s_%(process_num)02d %(here)s %%",
            "%(ENV_HOME)s/%(numprocs)d",
        ] {
            assert_eq!(
                expand(&pin(v), Scope::Process, &c),
                expand(v, Scope::Process, &c),
                "{v}"
            );
        }
    }

    #[test]
    fn expands_like_python_percent_formatting() {
        use Scope::*;
        check("plain", Process, Ok("plain"));
        check("50%%", Process, Ok("50%"));
        check("%%%%", Process, Ok("%%"));
        check("%(program_name)s_%(process_num)02d", Process, Ok("web_07"));
        check("%(process_num)d", Process, Ok("7"));
        check("%(process_num)5d|", Process, Ok("    7|"));
        check("%(process_num)-3d|", Process, Ok("7  |"));
        check("%(process_num)-03d|", Process, Ok("7  |"));
        check("%(program_name)05s", Process, Ok("  web"));
        check("%(numprocs)s", Process, Ok("12"));
        check("%(ENV_HOME)s/x", Process, Ok("/root/x"));
        check("%(here)s/../x", Program, Ok("/etc/supervisor/conf.d/../x"));
        check("%(host_node_name)s-%(group_name)s", Program, Ok("h1-web"));
    }

    #[test]
    fn refuses_what_supervisord_refuses_or_misreads() {
        use Scope::*;
        check("5%", Process, Err("bare '%'"));
        check("%s", Process, Err("bare '%'"));
        check("%(nope)s", Process, Err("not a name supervisord expands"));
        check("%(program_name", Process, Err("without a closing"));
        check("%(program_name)", Process, Err("missing its conversion"));
        check("%(program_name)d", Process, Err("needs a number"));
        check("%(process_num)x", Process, Err("conversion 'x'"));
        check("%(process_num)r", Process, Err("conversion 'r'"));
        check("%(process_num)d", Program, Err("not available"));
        check("%(ENV_HOME)s", ProcessName, Err("not allowed in process_name"));
        check("%(ENV_1X)s", Process, Err("not a name"));
        check("%(process_num)999d", Process, Err("width above 64"));
        check("%(ENV_UNSET)s", Process, Err("not defined"));
    }

    #[test]
    fn escape_then_expand_is_identity() {
        let s = "100% of 50%% (%(x)s)";
        assert_eq!(expand(&escape_percent(s), Scope::Process, &ctx()).as_deref(), Ok(s));
    }
}
