//! A reader for supervisord's INI dialect (Python's `RawConfigParser` with `;`/`#` inline
//! comments and `strict=False`), for `corral import`. No crate reads this dialect faithfully:
//! the inline-comment rule (a `;` or `#` at the start of a value or after whitespace) and
//! indented continuation lines are what decide what supervisord really runs.

/// One `[section]` with its options in file order. Keys are lower-cased as supervisord does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    /// 1-based line of the header.
    pub line: usize,
    /// (key, value, 1-based line); a later duplicate key wins, as in supervisord.
    pub entries: Vec<(String, String, usize)>,
}

impl Section {
    /// The value supervisord would use for `key` (the last one given).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _, _)| k == key)
            .map(|(_, v, _)| v.as_str())
    }
}

/// Where and why a file could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct IniError {
    pub line: usize,
    pub message: String,
}

/// A value read from continuation lines, as supervisord's shell-like splitting reads it: a
/// line break outside quotes separates words like a space; one inside quotes is part of the
/// argument, which a Corral spec (one line per value) cannot hold.
///
/// # Errors
/// A line break inside quotes.
pub fn fold_lines(value: &str) -> Result<String, String> {
    let mut quote: Option<char> = None;
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match (c, quote) {
            ('\n', Some(_)) => {
                return Err("a quoted argument spans lines: supervisord keeps the line break, which a Corral spec cannot hold (put the command in a script)".into());
            }
            ('\n', None) => out.push(' '),
            ('"' | '\'', None) => {
                quote = Some(c);
                out.push(c);
            }
            (c, Some(q)) if c == q => {
                quote = None;
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    Ok(out)
}

/// Cuts an inline comment: a `;` or `#` at the start or preceded by whitespace.
fn strip_inline_comment(line: &str) -> &str {
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        if (c == ';' || c == '#') && prev_space {
            return &line[..i];
        }
        prev_space = c.is_whitespace();
    }
    line
}

/// Parses INI text. Sections with the same name are merged, later keys winning, as
/// supervisord does across files too. Continuation lines (indented deeper than their key) are
/// joined to the value with a line break, as Python's ConfigParser does; [`fold_lines`] says
/// what supervisord makes of it.
///
/// # Errors
/// A line that is neither a header, an option, a comment nor a continuation, or an option
/// before any section.
pub fn parse(text: &str) -> Result<Vec<Section>, IniError> {
    let mut sections: Vec<Section> = Vec::new();
    let mut current: Option<usize> = None;
    let mut key_indent: Option<usize> = None;
    for (idx, raw) in text.lines().enumerate() {
        let lineno = idx + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        let value = strip_inline_comment(raw).trim();
        if value.is_empty() {
            continue;
        }
        let indent = raw.len() - raw.trim_start().len();
        if let (Some(s), Some(ki)) = (current, key_indent)
            && indent > ki
            && let Some(last) = sections[s].entries.last_mut()
        {
            // As Python's ConfigParser: the line break stays in the value (see `fold_lines`).
            if !last.1.is_empty() {
                last.1.push('\n');
            }
            last.1.push_str(value);
            continue;
        }
        if let Some(header) = value.strip_prefix('[')
            && let Some(end) = header.rfind(']')
        {
            let name = header[..end].to_string();
            current = Some(match sections.iter().position(|s| s.name == name) {
                Some(i) => i,
                None => {
                    sections.push(Section {
                        name,
                        line: lineno,
                        entries: Vec::new(),
                    });
                    sections.len() - 1
                }
            });
            key_indent = None;
            continue;
        }
        let Some(s) = current else {
            return Err(IniError {
                line: lineno,
                message: "option outside of any [section]".into(),
            });
        };
        let Some(pos) = value.find(['=', ':']) else {
            return Err(IniError {
                line: lineno,
                message: format!("{value:?} is not a key=value line"),
            });
        };
        let key = value[..pos].trim().to_ascii_lowercase();
        let val = value[pos + 1..].trim().to_string();
        sections[s].entries.push((key, val, lineno));
        key_indent = Some(indent);
    }
    Ok(sections)
}

/// Tokenises like Python's `shlex.shlex(s)` (non-POSIX) with `/.+-():` added to the word
/// characters, which is how supervisord 4.2 splits `environment=`.
fn supervisor_tokens(s: &str) -> Result<Vec<String>, String> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || "_/.+-():".contains(c);
    let mut tokens = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == ' ' || c == '\t' || c == '\r' || c == '\n' {
            chars.next();
        } else if c == '#' {
            // shlex comment: the rest of the line is dropped.
            for c in chars.by_ref() {
                if c == '\n' {
                    break;
                }
            }
        } else if c == '"' || c == '\'' {
            chars.next();
            let mut tok = String::from(c);
            loop {
                match chars.next() {
                    Some(q) if q == c => {
                        tok.push(q);
                        break;
                    }
                    Some(other) => tok.push(other),
                    None => return Err("no closing quotation".into()),
                }
            }
            tokens.push(tok);
        } else if is_word(c) {
            let mut tok = String::new();
            while let Some(&w) = chars.peek() {
                if !is_word(w) {
                    break;
                }
                tok.push(w);
                chars.next();
            }
            tokens.push(tok);
        } else {
            chars.next();
            tokens.push(c.to_string());
        }
    }
    Ok(tokens)
}

/// Reads an `environment=` value as supervisord 4.2 does (`dict_of_key_value_pairs`), keeping
/// `%` expansions as written.
///
/// # Errors
/// What supervisord would say: unbalanced quotes or a malformed `KEY=value` list.
pub fn environment_pairs(value: &str) -> Result<Vec<(String, String)>, String> {
    // supervisord expands `%` before splitting; keep each expansion whole by hiding it behind
    // a word token while splitting.
    let mut hidden = Vec::new();
    let mut masked = String::new();
    let mut rest = value;
    while let Some(pos) = rest.find('%') {
        masked.push_str(&rest[..pos]);
        let after = &rest[pos..];
        let len = if after.starts_with("%%") {
            2
        } else if after.starts_with("%(") {
            after
                .find(')')
                .and_then(|close| {
                    after[close + 1..]
                        .find(|c: char| c.is_ascii_alphabetic())
                        .map(|conv| close + 2 + conv)
                })
                .unwrap_or(after.len())
        } else {
            1
        };
        masked.push_str(&format!("corralhidden{}x", hidden.len()));
        hidden.push(after[..len].to_string());
        rest = &after[len..];
    }
    masked.push_str(rest);
    let unmask = |s: &str| {
        let mut out = s.to_string();
        for (i, h) in hidden.iter().enumerate().rev() {
            out = out.replace(&format!("corralhidden{i}x"), h);
        }
        out
    };
    let tokens = supervisor_tokens(&masked)?;
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        match tokens.get(i..i + 3) {
            Some([k, eq, v]) if eq == "=" => {
                pairs.push((unmask(k), unmask(v.trim_matches(['\'', '"']))));
            }
            _ => return Err(format!("unexpected end of key/value pairs in {value:?}")),
        }
        i += 4;
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sections_comments_and_continuations() {
        let text = "; comment\n[program:web]\ncommand = /bin/echo a ;b\nCommand2: x#y\nenvironment=\n    A=\"1\",\n    B=\"2\" ; trailing\n\n# hash comment\n[group:g]\nprograms=web\n";
        let s = parse(text).expect("parses");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "program:web");
        assert_eq!(s[0].get("command"), Some("/bin/echo a"));
        assert_eq!(s[0].get("command2"), Some("x#y"));
        assert_eq!(s[0].get("environment"), Some("A=\"1\",\nB=\"2\""));
        assert_eq!(s[1].get("programs"), Some("web"));
    }

    #[test]
    fn line_breaks_fold_to_spaces_outside_quotes_and_are_refused_inside() {
        assert_eq!(fold_lines("A=\"1\",\nB=\"2\"").as_deref(), Ok("A=\"1\", B=\"2\""));
        assert_eq!(fold_lines("/bin/sh -c\n'echo a'").as_deref(), Ok("/bin/sh -c 'echo a'"));
        assert!(fold_lines("/bin/sh -c 'echo a\necho b'").is_err());
        assert!(fold_lines("x \"a\nb\"").is_err());
    }

    #[test]
    fn duplicate_sections_merge_and_the_last_key_wins() {
        let s = parse("[program:a]\ncommand=1\n[program:a]\ncommand=2\n").expect("parses");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].get("command"), Some("2"));
    }

    #[test]
    fn refuses_options_outside_sections_and_lines_without_a_delimiter() {
        assert_eq!(parse("command=x\n").map_err(|e| e.line), Err(1));
        assert_eq!(parse("[a]\nnot an option\n").map_err(|e| e.line), Err(2));
    }

    #[test]
    fn environment_is_split_as_supervisord_splits_it() {
        let got = environment_pairs("A=\"1,2\",B=plain,C='q',D=\"%(ENV_HOME)s/x\",E=%(program_name)s").expect("parses");
        let want = [
            ("A", "1,2"),
            ("B", "plain"),
            ("C", "q"),
            ("D", "%(ENV_HOME)s/x"),
            ("E", "%(program_name)s"),
        ];
        assert_eq!(got, want.map(|(k, v)| (k.to_string(), v.to_string())));
        assert!(environment_pairs("A=\"unclosed").is_err());
        assert!(environment_pairs("A=").is_err());
    }
}
