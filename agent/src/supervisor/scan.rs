//! A fast decoder for the one answer every pass asks for: `getAllProcessInfo`.
//!
//! With a hundred programs that answer is ~130 kB of XML, ~20 000 XML events. Decoding it
//! through dxr (serde into a tree of generic values, then into [`ProcessInfo`]) cost ~4 ms of
//! CPU, and even a bare quick-xml event loop ~1.2 ms: more than the 2 ms a whole quiet pass
//! may cost. supervisord writes this answer in one fixed shape (Python's `xmlrpc.client`), so
//! this scanner reads exactly XML-RPC's grammar for it (an array of structs of string and
//! integer members, whitespace between elements, bare or typed strings, `<string/>`) and
//! fills [`ProcessInfo`] directly; character data is unescaped by quick-xml.
//!
//! Anything outside that grammar (comments, CDATA, attributes, a carriage return that XML
//! would normalise, a fault) is declined with the reason, and the caller decodes the answer
//! with dxr instead: an unusual but valid answer still works, and a broken one gets dxr's
//! error. Tests check that both decoders read the same values.

use std::borrow::Cow;

use quick_xml::escape::{resolve_xml_entity, unescape_with};

use super::types::{ProcessInfo, ProcessState};

/// Decodes a `supervisor.getAllProcessInfo` method response.
///
/// # Errors
/// Why the answer is not in the grammar this decoder reads.
pub(crate) fn decode_all_process_info(xml: &str) -> Result<Vec<ProcessInfo>, String> {
    let mut c = Cursor { s: xml, pos: 0 };
    c.ws();
    if c.rest().starts_with("<?xml") {
        let end = c.rest().find("?>").ok_or("unterminated XML declaration")?;
        c.pos += end + 2;
    }
    for tag in ["<methodResponse>", "<params>", "<param>", "<value>", "<array>"] {
        c.expect(tag)?;
    }
    let mut out = Vec::new();
    if !c.eat_ws("<data/>") {
        c.expect("<data>")?;
        while c.eat_ws("<value>") {
            c.expect("<struct>")?;
            let mut info = Partial::default();
            while c.eat_ws("<member>") {
                c.expect("<name>")?;
                let key = c.text()?;
                c.expect("</name>")?;
                c.expect("<value>")?;
                let value = c.scalar()?;
                c.expect("</member>")?;
                info.set(&key, value)?;
            }
            c.expect("</struct>")?;
            c.expect("</value>")?;
            out.push(info.finish()?);
        }
        c.expect("</data>")?;
    }
    for tag in ["</array>", "</value>", "</param>", "</params>", "</methodResponse>"] {
        c.expect(tag)?;
    }
    c.ws();
    if c.pos != xml.len() {
        return Err(format!("unexpected content after </methodResponse> at byte {}", c.pos));
    }
    Ok(out)
}

/// A scalar member value.
enum Scalar<'a> {
    Int(i64),
    Str(Cow<'a, str>),
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    /// Skips XML whitespace.
    fn ws(&mut self) {
        let bytes = self.s.as_bytes();
        while bytes
            .get(self.pos)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.pos += 1;
        }
    }

    /// Consumes `lit` after optional whitespace, if it is there.
    fn eat_ws(&mut self, lit: &str) -> bool {
        let save = self.pos;
        self.ws();
        if self.rest().starts_with(lit) {
            self.pos += lit.len();
            true
        } else {
            self.pos = save;
            false
        }
    }

    fn expect(&mut self, lit: &str) -> Result<(), String> {
        if self.eat_ws(lit) {
            return Ok(());
        }
        Err(format!("expected {lit} at byte {}, found {:?}", self.pos, self.ahead()))
    }

    /// What comes next, for an error message.
    fn ahead(&self) -> String {
        self.rest().trim_start().chars().take(24).collect()
    }

    /// Character data up to the next `<`, unescaped.
    fn text(&mut self) -> Result<Cow<'a, str>, String> {
        let rest = self.rest();
        let bytes = rest.as_bytes();
        let mut end = 0;
        let mut escaped = false;
        // One scan for the end, a reference to resolve, and a carriage return to refuse.
        loop {
            match memchr::memchr3(b'<', b'&', b'\r', &bytes[end..]).map(|i| (end + i, bytes[end + i])) {
                Some((i, b'<')) => {
                    end = i;
                    break;
                }
                Some((i, b'&')) => {
                    escaped = true;
                    end = i + 1;
                }
                Some(_) => return Err("a carriage return in character data (XML normalises it)".into()),
                None => return Err("unterminated character data".into()),
            }
        }
        let raw = &rest[..end];
        self.pos += end;
        if !escaped {
            return Ok(Cow::Borrowed(raw));
        }
        unescape_with(raw, resolve_xml_entity).map_err(|e| format!("character data {raw:?}: {e}"))
    }

    /// The rest of a `<value>`: `<int>`/`<i4>`, `<string>` or bare text, then `</value>`.
    /// Typed values, the usual case, are tried first.
    fn scalar(&mut self) -> Result<Scalar<'a>, String> {
        let typed = [
            ("<string/>", ""),
            ("<string>", "</string>"),
            ("<int>", "</int>"),
            ("<i4>", "</i4>"),
        ]
        .into_iter()
        .find(|(open, _)| self.eat_ws(open));
        let value = match typed {
            Some(("<string/>", _)) => Scalar::Str(Cow::Borrowed("")),
            Some((open, close)) => {
                let text = self.text()?;
                self.expect(close)?;
                if open == "<string>" {
                    Scalar::Str(text)
                } else {
                    // XML-RPC's int is 32 bits (Python's marshaller refuses more), as dxr reads it.
                    let int: i32 = text.trim().parse().map_err(|e| format!("{open}{text}{close}: {e}"))?;
                    Scalar::Int(i64::from(int))
                }
            }
            None => {
                // Bare text; whitespace before a typed value was skipped above.
                let start = self.pos;
                let bare = self.text()?;
                if !self.rest().starts_with("</value>") {
                    return Err(if bare.trim().is_empty() {
                        format!("unexpected {:?} in a process info value", self.ahead())
                    } else {
                        format!("mixed content in <value> at byte {start}")
                    });
                }
                Scalar::Str(bare)
            }
        };
        self.expect("</value>")?;
        Ok(value)
    }
}

#[derive(Default)]
struct Partial {
    name: Option<String>,
    group: Option<String>,
    state: Option<i64>,
    statename: Option<String>,
    start: Option<i64>,
    stop: Option<i64>,
    now: Option<i64>,
    pid: Option<i64>,
    exitstatus: Option<i64>,
    spawnerr: Option<String>,
    stdout_logfile: Option<String>,
    stderr_logfile: Option<String>,
    description: Option<String>,
}

impl Partial {
    fn set(&mut self, key: &str, value: Scalar<'_>) -> Result<(), String> {
        let int = |slot: &mut Option<i64>, v: Scalar<'_>| match v {
            Scalar::Int(i) => {
                *slot = Some(i);
                Ok(())
            }
            Scalar::Str(s) => Err(format!("member {key:?}: expected an int, got the string {s:?}")),
        };
        let string = |slot: &mut Option<String>, v: Scalar<'_>| match v {
            Scalar::Str(s) => {
                *slot = Some(s.into_owned());
                Ok(())
            }
            Scalar::Int(i) => Err(format!("member {key:?}: expected a string, got the int {i}")),
        };
        match key {
            "name" => string(&mut self.name, value),
            "group" => string(&mut self.group, value),
            "statename" => string(&mut self.statename, value),
            "spawnerr" => string(&mut self.spawnerr, value),
            "stdout_logfile" => string(&mut self.stdout_logfile, value),
            "stderr_logfile" => string(&mut self.stderr_logfile, value),
            "description" => string(&mut self.description, value),
            "state" => int(&mut self.state, value),
            "start" => int(&mut self.start, value),
            "stop" => int(&mut self.stop, value),
            "now" => int(&mut self.now, value),
            "pid" => int(&mut self.pid, value),
            "exitstatus" => int(&mut self.exitstatus, value),
            // `logfile` (an alias of stdout_logfile) and members of later versions.
            _ => Ok(()),
        }
    }

    fn finish(self) -> Result<ProcessInfo, String> {
        fn req<T>(v: Option<T>, key: &str) -> Result<T, String> {
            v.ok_or_else(|| format!("missing member {key:?}"))
        }
        let state = req(self.state, "state")?;
        Ok(ProcessInfo {
            name: req(self.name, "name")?,
            group: req(self.group, "group")?,
            state: ProcessState::from_code(i32::try_from(state).unwrap_or(-1)),
            statename: req(self.statename, "statename")?,
            start: req(self.start, "start")?,
            stop: req(self.stop, "stop")?,
            now: req(self.now, "now")?,
            pid: req(self.pid, "pid")?,
            exitstatus: req(self.exitstatus, "exitstatus")?,
            spawnerr: req(self.spawnerr, "spawnerr")?,
            stdout_logfile: req(self.stdout_logfile, "stdout_logfile")?,
            stderr_logfile: req(self.stderr_logfile, "stderr_logfile")?,
            description: req(self.description, "description")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use dxr::{MethodResponse, Value};
    use proptest::prelude::*;

    use super::*;
    use crate::supervisor::types::decode_process_infos;

    fn info(name: &str, description: &str) -> ProcessInfo {
        ProcessInfo {
            name: name.into(),
            group: "g".into(),
            state: ProcessState::Running,
            statename: "RUNNING".into(),
            start: 1_795_618_137,
            stop: 0,
            now: 1_795_618_144,
            pid: 24562,
            exitstatus: 0,
            spawnerr: String::new(),
            stdout_logfile: "/var/log/a.log".into(),
            stderr_logfile: String::new(),
            description: description.into(),
        }
    }

    /// The answer as dxr encodes it (`logfile` included, as supervisord sends it).
    fn encode(infos: &[ProcessInfo], pretty: bool) -> String {
        let s = |v: &str| Value::String(v.to_string());
        let items = infos
            .iter()
            .map(|i| {
                let i32_of = |v: i64| Value::Integer(i32::try_from(v).unwrap_or(i32::MAX));
                let members: BTreeMap<String, Value> = [
                    ("name", s(&i.name)),
                    ("group", s(&i.group)),
                    ("state", i32_of(20)),
                    ("statename", s(&i.statename)),
                    ("start", i32_of(i.start)),
                    ("stop", i32_of(i.stop)),
                    ("now", i32_of(i.now)),
                    ("pid", i32_of(i.pid)),
                    ("exitstatus", i32_of(i.exitstatus)),
                    ("spawnerr", s(&i.spawnerr)),
                    ("logfile", s(&i.stdout_logfile)),
                    ("stdout_logfile", s(&i.stdout_logfile)),
                    ("stderr_logfile", s(&i.stderr_logfile)),
                    ("description", s(&i.description)),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                Value::Struct(members)
            })
            .collect();
        let response = MethodResponse {
            value: Value::Array(items),
        };
        let xml = if pretty {
            response.to_xml_pretty()
        } else {
            response.to_xml()
        };
        xml.expect("dxr encodes a response")
    }

    fn via_dxr(xml: &str) -> Vec<ProcessInfo> {
        let value = MethodResponse::from_xml(xml).expect("dxr decodes it").value;
        decode_process_infos(&value).expect("dxr's answer is process infos")
    }

    /// A two-process answer exactly as supervisord 4.2 writes it (Python's xmlrpc.client).
    const SUPERVISORD_ANSWER: &str = "<?xml version='1.0'?>
<methodResponse>
<params>
<param>
<value><array><data>
<value><struct>
<member>
<name>name</name>
<value><string>web</string></value>
</member>
<member>
<name>group</name>
<value><string>shop</string></value>
</member>
<member>
<name>start</name>
<value><int>1795618137</int></value>
</member>
<member>
<name>stop</name>
<value><int>0</int></value>
</member>
<member>
<name>now</name>
<value><int>1795618144</int></value>
</member>
<member>
<name>state</name>
<value><int>20</int></value>
</member>
<member>
<name>statename</name>
<value><string>RUNNING</string></value>
</member>
<member>
<name>spawnerr</name>
<value><string></string></value>
</member>
<member>
<name>exitstatus</name>
<value><int>0</int></value>
</member>
<member>
<name>logfile</name>
<value><string>/var/log/web.log</string></value>
</member>
<member>
<name>stdout_logfile</name>
<value><string>/var/log/web.log</string></value>
</member>
<member>
<name>stderr_logfile</name>
<value><string></string></value>
</member>
<member>
<name>pid</name>
<value><int>24562</int></value>
</member>
<member>
<name>description</name>
<value><string>pid 24562, uptime 0:00:07</string></value>
</member>
</struct></value>
<value><struct>
<member><name>name</name><value><string>worker_01</string></value></member>
<member><name>group</name><value><string>shop</string></value></member>
<member><name>start</name><value><int>0</int></value></member>
<member><name>stop</name><value><int>0</int></value></member>
<member><name>now</name><value><int>1795618144</int></value></member>
<member><name>state</name><value><int>200</int></value></member>
<member><name>statename</name><value><string>FATAL</string></value></member>
<member><name>spawnerr</name><value><string>can't find command '/opt/a&amp;b &lt;x&gt;'</string></value></member>
<member><name>exitstatus</name><value><int>0</int></value></member>
<member><name>stdout_logfile</name><value><string>/dev/null</string></value></member>
<member><name>stderr_logfile</name><value><string>/dev/null</string></value></member>
<member><name>pid</name><value><int>0</int></value></member>
<member><name>description</name><value><string>can't find command '/opt/a&amp;b &lt;x&gt;'</string></value></member>
</struct></value>
</data></array></value>
</param>
</params>
</methodResponse>
";

    #[test]
    fn decodes_supervisords_own_answer() {
        let infos = decode_all_process_info(SUPERVISORD_ANSWER).expect("decodes");
        assert_eq!(infos, via_dxr(SUPERVISORD_ANSWER));
        assert_eq!(infos.len(), 2);
        let web = &infos[0];
        assert_eq!((web.name.as_str(), web.group.as_str()), ("web", "shop"));
        assert_eq!(
            (web.state, web.pid, web.start),
            (ProcessState::Running, 24562, 1_795_618_137)
        );
        assert_eq!(web.stdout_logfile, "/var/log/web.log");
        assert_eq!(web.description, "pid 24562, uptime 0:00:07");
        let worker = &infos[1];
        assert_eq!(worker.state, ProcessState::Fatal);
        assert_eq!(worker.spawnerr, "can't find command '/opt/a&b <x>'");
        assert_eq!(worker.namespec(), "shop:worker_01");
    }

    #[test]
    fn decodes_every_shape_xml_rpc_allows_for_these_values() {
        let base = encode(&[info("a", "d")], false);
        let variants = [
            // A bare string is a string; an empty <value/> is "".
            ("<value><string>d</string></value>", "<value>d</value>", "d"),
            ("<value><string>d</string></value>", "<value></value>", ""),
            ("<value><string>d</string></value>", "<value><string/></value>", ""),
            ("<value><string>d</string></value>", "<value>  </value>", "  "),
            // References and CDATA, bare and typed.
            ("<value><string>d</string></value>", "<value>x &amp; y</value>", "x & y"),
            ("<value><string>d</string></value>", "<value>&lt;x</value>", "<x"),
            (
                "<value><string>d</string></value>",
                "<value><string>&#233;&#x41;</string></value>",
                "éA",
            ),
            // Whitespace around a typed value is layout.
            (
                "<value><string>d</string></value>",
                "<value>\n  <string>d2</string>\n</value>",
                "d2",
            ),
        ];
        for (from, to, want) in variants {
            let xml = base.replacen(from, to, 1);
            assert_ne!(xml, base, "{from} not in {base}");
            let infos = decode_all_process_info(&xml).unwrap_or_else(|e| panic!("{to}: {e}"));
            assert_eq!(infos[0].description, want, "{to}");
        }
        // dxr writes <i4>; supervisord writes <int>.
        let int = base.replace("<i4>24562</i4>", "<int>24562</int>");
        assert_ne!(int, base);
        assert_eq!(decode_all_process_info(&int).map(|i| i[0].pid), Ok(24562));
        let with_declaration = format!("<?xml version=\"1.0\"?>\n{base}\n");
        assert_eq!(decode_all_process_info(&with_declaration).map(|i| i.len()), Ok(1));
        assert_eq!(decode_all_process_info(&encode(&[], false)), Ok(vec![]));
    }

    #[test]
    fn declines_what_is_not_this_answer() {
        let base = encode(&[info("a", "d")], false);
        let cases = [
            (
                base.replace("<name>pid</name>", "<name>pod</name>"),
                "missing member \"pid\"",
            ),
            (
                base.replace("<i4>24562</i4>", "<string>24562</string>"),
                "expected an int",
            ),
            (base.replace("<i4>24562</i4>", "<double>1.5</double>"), "\"<double>1.5"),
            (base.replace("<i4>24562</i4>", "<i4>x</i4>"), "<i4>x</i4>"),
            (base.replace("<string>d</string>", "<string>&bogus;</string>"), "bogus"),
            (
                base.replace("<string>d</string>", "<string>a\r\nb</string>"),
                "carriage return",
            ),
            (
                base.replace("<string>d</string>", "<string><![CDATA[d]]></string>"),
                "CDATA",
            ),
            (base.replace("<struct>", "<struct><!-- c -->"), "<!-- c -->"),
            (
                base.replace("<value><string>d</string>", "<value>x<string>d</string>"),
                "mixed content",
            ),
            (
                base[..base.find("</data>").unwrap_or(0)].to_string(),
                "expected </data>",
            ),
            (base[..base.len() / 2].to_string(), "expected"),
            (format!("{base}<x/>"), "after </methodResponse>"),
            (
                "<?xml version=\"1.0\"?><methodResponse><fault><value><struct></struct></value></fault>\
                 </methodResponse>"
                    .to_string(),
                "expected <params>",
            ),
        ];
        for (xml, want) in cases {
            match decode_all_process_info(&xml) {
                Ok(v) => panic!("accepted {xml}: {v:?}"),
                Err(e) => assert!(e.contains(want), "{e} should say {want}"),
            }
        }
    }

    fn text() -> impl Strategy<Value = String> {
        // Any character XML 1.0 can carry, except CR, which XML normalises (tested above).
        proptest::string::string_regex("[\\t\\n\\x20-\\u{D7FF}\\u{E000}-\\u{FFFD}]{0,24}").expect("a valid regex")
    }

    /// Cases per property: `CORRAL_FUZZ_CASES` (`scripts/fuzz`), or `default` in the suite.
    fn cases(default: u32) -> u32 {
        std::env::var("CORRAL_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Pieces of XML and XML-RPC to splice into an answer.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::string::string_regex("[<>/&;'\"=a-z0-9 \t\n\r#x\u{0}\u{FFFF}日]{0,6}").expect("a valid regex"),
            Just("<value>".to_string()),
            Just("</value>".to_string()),
            Just("<int>-1</int>".to_string()),
            Just("<i4>99999999999999999999</i4>".to_string()),
            Just("<string>".to_string()),
            Just("</struct>".to_string()),
            Just("<member><name>pid</name><value><int>1</int></value></member>".to_string()),
            Just("&amp;".to_string()),
            Just("&#xD800;".to_string()),
            Just("<![CDATA[x]]>".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(2_000), ..ProptestConfig::default() })]

        /// supervisord's answer with pieces cut out and spliced in: the fast decoder never
        /// panics, and what it accepts dxr decodes to the same processes.
        #[test]
        fn a_mangled_answer_never_panics_and_what_is_accepted_is_what_dxr_reads(
            edits in proptest::collection::vec((0.0..1.0f64, 0usize..12, piece()), 1..5),
        ) {
            // The body only: the scanner skips the XML declaration without reading it (it
            // comes from the local supervisord), where dxr checks it.
            let prolog = SUPERVISORD_ANSWER.find("?>").map_or(0, |i| i + 2);
            let mut xml = SUPERVISORD_ANSWER.to_string();
            for (at, cut, with) in edits {
                let body = xml.len() - prolog;
                let mut i = (prolog + (at * body as f64) as usize).min(xml.len());
                while !xml.is_char_boundary(i) {
                    i -= 1;
                }
                let mut end = (i + cut).min(xml.len());
                while !xml.is_char_boundary(end) {
                    end += 1;
                }
                xml.replace_range(i..end, &with);
            }
            if let Ok(fast) = decode_all_process_info(&xml) {
                let dxr = MethodResponse::from_xml(&xml).map_err(|e| e.to_string()).and_then(|r| decode_process_infos(&r.value).map_err(|e| e.to_string()));
                prop_assert_eq!(Ok(fast), dxr, "{}", xml);
            }
        }
    }

    proptest! {
        /// Whatever the strings, the fast decoder reads what dxr reads.
        #[test]
        fn agrees_with_dxr(
            rows in proptest::collection::vec((text(), text(), text(), 0i64..i64::from(i32::MAX)), 0..6),
            pretty in any::<bool>(),
        ) {
            let infos: Vec<ProcessInfo> = rows
                .into_iter()
                .map(|(name, description, spawnerr, pid)| ProcessInfo { spawnerr, pid, ..info(&name, &description) })
                .collect();
            let xml = encode(&infos, pretty);
            let fast = decode_all_process_info(&xml);
            prop_assert_eq!(fast.as_ref(), Ok(&via_dxr(&xml)), "{}", xml);
            prop_assert_eq!(fast, Ok(infos));
        }
    }
}
