//! Environment files: a program's environment values read on its host from a file
//! (`spec.environment_file`), so secrets need not be stored in etcd. The format is systemd's
//! `EnvironmentFile=`: `KEY=VALUE` lines; blank lines and lines starting with `#` or `;` are
//! skipped; an `export ` before the key is allowed (files also sourced by a shell); a value
//! wholly in double or single quotes loses them; nothing else is unescaped. A key given twice
//! takes its last value. The file's values override the spec's `environment` (as systemd's
//! `EnvironmentFile=` overrides `Environment=`); every value is then validated like one in
//! the spec.

use std::collections::BTreeMap;

/// The largest environment file read.
pub const MAX_ENVIRONMENT_FILE_BYTES: usize = 64 << 10;

/// The variables an environment file sets.
///
/// # Errors
/// The first line that is not `KEY=VALUE`, by number.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, String> {
    if text.len() > MAX_ENVIRONMENT_FILE_BYTES {
        return Err(format!(
            "is {} bytes, more than the {MAX_ENVIRONMENT_FILE_BYTES}-byte limit",
            text.len()
        ));
    }
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {}: not KEY=VALUE", i + 1));
        };
        let key = key.trim_end();
        if key.is_empty() {
            return Err(format!("line {}: no variable name before '='", i + 1));
        }
        let value = value.trim_start();
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
            .filter(|_| value.len() >= 2);
        out.insert(key.to_string(), unquoted.unwrap_or(value).to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_systemd_style_lines() {
        let env = parse(
            "# database\nDB_URL=postgres://db/app\n\n; old style comment\nexport TOKEN = 'a b c'\nQUOTED=\"x=1\"\nEMPTY=\nDB_URL=postgres://db2/app\n",
        )
        .expect("parses");
        assert_eq!(env["DB_URL"], "postgres://db2/app");
        assert_eq!(env["TOKEN"], "a b c");
        assert_eq!(env["QUOTED"], "x=1");
        assert_eq!(env["EMPTY"], "");
        assert_eq!(env.len(), 4);
    }

    #[test]
    fn a_line_that_is_not_key_value_is_named() {
        assert_eq!(
            parse("A=1\njust words\n").expect_err("refused"),
            "line 2: not KEY=VALUE"
        );
        assert_eq!(
            parse("=1\n").expect_err("refused"),
            "line 1: no variable name before '='"
        );
        assert!(
            parse(&"A=1\n".repeat(20_000))
                .expect_err("too big")
                .contains("65536-byte limit")
        );
    }
}
