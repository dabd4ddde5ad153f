//! The QMP JSON streamer: bytes in, complete JSON values (or parse errors) out, with QEMU's
//! lexical rules and error recovery, plus a writer that formats values the way QEMU does.
//!
//! QEMU splits its input stream into messages by lexing tokens and counting braces and
//! brackets (`qobject/json-lexer.c`, `json-streamer.c`); this module follows the same rules so
//! that a client sees the same answers:
//!
//! - a message ends when a token leaves both counts at zero, or when a count goes negative
//!   (`{]` is then one parse error);
//! - single-quoted strings are accepted (QEMU's extension), strings may not contain control
//!   characters or the impossible UTF-8 bytes 0xFE/0xFF;
//! - a lexical error answers one "JSON parse error" and puts the lexer into recovery, where it
//!   skips everything up to a structural character (`{`, `}`, `[`, `]`), a control character
//!   other than tab, or 0xFE/0xFF, so the next good command is understood.
//!
//! Unlike QEMU, a message larger than the configured bound, or nested too deeply, is answered
//! with one error and the rest of that message is skipped without being stored: memory stays
//! bounded and the connection stays usable.
//!
//! This module does no I/O and never panics on any input.

use serde_json::{Map, Number, Value};

/// Deepest nesting of objects and arrays accepted in one message.
pub const MAX_NESTING: usize = 64;

/// A complete message or the error that ended it.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A parsed JSON value.
    Value(Value),
    /// A parse error, already phrased as QEMU phrases it ("JSON parse error, ...").
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    Str,
}

#[derive(Debug)]
struct Token {
    kind: Kind,
    text: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Nonzero,
    Neg,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What one byte does to the lexer.
enum Step {
    /// Consumed; the token goes on (or whitespace was skipped).
    Continue(Lex),
    /// Consumed and completes a token of this kind.
    Complete(Kind),
    /// Not consumed: the token before it is complete; feed the byte again from `Start`.
    CompleteBefore(Kind),
    /// Not consumed: leave recovery and feed the byte again from `Start`.
    Resync,
    /// Consumed: a lexical error.
    Error,
}

/// Splits a byte stream into JSON messages.
#[derive(Debug)]
pub struct JsonStreamer {
    state: Lex,
    token: Vec<u8>,
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
    /// Bytes held for the current message (stored tokens).
    held: usize,
    max_message: usize,
    /// Skipping the rest of a message that was too large or too deep.
    discarding: bool,
}

impl JsonStreamer {
    /// A streamer that answers messages larger than `max_message` bytes with an error.
    pub fn new(max_message: usize) -> Self {
        JsonStreamer {
            state: Lex::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
            held: 0,
            max_message: max_message.max(1),
            discarding: false,
        }
    }

    /// Forget any partial message (a new connection).
    pub fn reset(&mut self) {
        self.state = Lex::Start;
        self.token.clear();
        self.clear_message();
        self.discarding = false;
    }

    /// Whether a partial message is pending.
    pub fn is_idle(&self) -> bool {
        self.state == Lex::Start && self.tokens.is_empty() && !self.discarding
    }

    fn clear_message(&mut self) {
        self.tokens.clear();
        self.braces = 0;
        self.brackets = 0;
        self.held = 0;
    }

    /// Feed bytes; complete messages and errors are appended to `out` in order.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Message>) {
        for &b in data {
            self.feed_byte(b, out);
        }
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Message>) {
        // A byte is fed at most twice: once to end the token before it, once from Start.
        loop {
            match step(self.state, b) {
                Step::Continue(next) => {
                    if next != Lex::Start && next != Lex::Recovery {
                        self.push_byte(b, out);
                    }
                    self.state = next;
                    return;
                }
                Step::Complete(kind) => {
                    self.push_byte(b, out);
                    self.state = Lex::Start;
                    self.complete(kind, out);
                    return;
                }
                Step::CompleteBefore(kind) => {
                    self.state = Lex::Start;
                    self.complete(kind, out);
                }
                Step::Resync => self.state = Lex::Start,
                Step::Error => {
                    self.push_byte(b, out);
                    self.lexical_error(out);
                    return;
                }
            }
        }
    }

    /// Append a byte of the current token, or start discarding when the message gets too big.
    fn push_byte(&mut self, b: u8, out: &mut Vec<Message>) {
        if self.discarding {
            return;
        }
        if self.held + self.token.len() + 1 > self.max_message {
            out.push(Message::Error(format!(
                "JSON parse error, message exceeds the limit of {} bytes",
                self.max_message
            )));
            self.start_discarding();
            return;
        }
        self.token.push(b);
    }

    fn start_discarding(&mut self) {
        self.discarding = true;
        self.token.clear();
        self.tokens.clear();
        self.held = 0;
    }

    fn lexical_error(&mut self, out: &mut Vec<Message>) {
        if !self.discarding {
            let stray = String::from_utf8_lossy(&self.token).into_owned();
            out.push(Message::Error(format!("JSON parse error, stray '{stray}'")));
        }
        self.token.clear();
        self.clear_message();
        self.discarding = false;
        self.state = Lex::Recovery;
    }

    /// Whether the message goes on after the counts were updated.
    fn message_open(&self) -> bool {
        (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0
    }

    fn complete(&mut self, kind: Kind, out: &mut Vec<Message>) {
        match kind {
            Kind::LCurly => self.braces += 1,
            Kind::RCurly => self.braces -= 1,
            Kind::LSquare => self.brackets += 1,
            Kind::RSquare => self.brackets -= 1,
            _ => {}
        }
        let text = std::mem::take(&mut self.token);
        if self.discarding {
            if !self.message_open() {
                self.discarding = false;
                self.clear_message();
            }
            return;
        }
        let depth = self.braces.max(0) + self.brackets.max(0);
        if depth > MAX_NESTING as i64 {
            out.push(Message::Error(
                "JSON parse error, nesting depth limit exceeded".to_string(),
            ));
            self.start_discarding();
            return;
        }
        self.held += text.len();
        self.tokens.push(Token { kind, text });
        if self.message_open() {
            return;
        }
        let tokens = std::mem::take(&mut self.tokens);
        self.clear_message();
        out.push(match parse(&tokens) {
            Ok(v) => Message::Value(v),
            Err(e) => Message::Error(format!("JSON parse error, {e}")),
        });
    }
}

fn is_digit(b: u8) -> bool {
    b.is_ascii_digit()
}

/// The lexer's transition table.
fn step(state: Lex, b: u8) -> Step {
    use Lex::*;
    match state {
        Start => match b {
            b' ' | b'\t' | b'\r' | b'\n' => Step::Continue(Start),
            b'"' => Step::Continue(DqString),
            b'\'' => Step::Continue(SqString),
            b'0' => Step::Continue(Zero),
            b'1'..=b'9' => Step::Continue(Nonzero),
            b'-' => Step::Continue(Neg),
            b'{' => Step::Complete(Kind::LCurly),
            b'}' => Step::Complete(Kind::RCurly),
            b'[' => Step::Complete(Kind::LSquare),
            b']' => Step::Complete(Kind::RSquare),
            b',' => Step::Complete(Kind::Comma),
            b':' => Step::Complete(Kind::Colon),
            b'a'..=b'z' => Step::Continue(Keyword),
            _ => Step::Error,
        },
        Recovery => match b {
            b'\t' => Step::Continue(Recovery),
            0x00..=0x1f | 0xfe | 0xff | b'{' | b'}' | b'[' | b']' => Step::Resync,
            _ => Step::Continue(Recovery),
        },
        DqString | SqString => {
            let quote = if state == DqString { b'"' } else { b'\'' };
            match b {
                b'\\' => Step::Continue(if state == DqString {
                    DqEscape
                } else {
                    SqEscape
                }),
                _ if b == quote => Step::Complete(Kind::Str),
                0x20..=0xfd => Step::Continue(state),
                _ => Step::Error,
            }
        }
        DqEscape | SqEscape => match b {
            0x20..=0xfd => Step::Continue(if state == DqEscape {
                DqString
            } else {
                SqString
            }),
            _ => Step::Error,
        },
        Zero => match b {
            b'.' => Step::Continue(Mantissa),
            _ if is_digit(b) => Step::Error,
            _ => Step::CompleteBefore(Kind::Integer),
        },
        Nonzero => match b {
            b'e' | b'E' => Step::Continue(ExpE),
            b'.' => Step::Continue(Mantissa),
            _ if is_digit(b) => Step::Continue(Nonzero),
            _ => Step::CompleteBefore(Kind::Integer),
        },
        Neg => match b {
            b'0' => Step::Continue(Zero),
            b'1'..=b'9' => Step::Continue(Nonzero),
            _ => Step::Error,
        },
        Mantissa => match b {
            _ if is_digit(b) => Step::Continue(MantissaDigits),
            _ => Step::Error,
        },
        MantissaDigits => match b {
            b'e' | b'E' => Step::Continue(ExpE),
            _ if is_digit(b) => Step::Continue(MantissaDigits),
            _ => Step::CompleteBefore(Kind::Float),
        },
        ExpE => match b {
            b'+' | b'-' => Step::Continue(ExpSign),
            _ if is_digit(b) => Step::Continue(ExpDigits),
            _ => Step::Error,
        },
        ExpSign => match b {
            _ if is_digit(b) => Step::Continue(ExpDigits),
            _ => Step::Error,
        },
        ExpDigits => match b {
            _ if is_digit(b) => Step::Continue(ExpDigits),
            _ => Step::CompleteBefore(Kind::Float),
        },
        Keyword => match b {
            b'a'..=b'z' => Step::Continue(Keyword),
            _ => Step::CompleteBefore(Kind::Keyword),
        },
    }
}

/// Recursive-descent parser over one message's tokens. Nesting is bounded by the streamer.
struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
}

fn parse(tokens: &[Token]) -> Result<Value, String> {
    let mut p = Parser { tokens, pos: 0 };
    let v = p.value()?;
    if p.pos != tokens.len() {
        return Err("expecting end of input".to_string());
    }
    Ok(v)
}

impl<'a> Parser<'a> {
    fn next(&mut self) -> Option<&'a Token> {
        let t = self.tokens.get(self.pos)?;
        self.pos += 1;
        Some(t)
    }

    fn peek(&self) -> Option<&'a Token> {
        self.tokens.get(self.pos)
    }

    fn value(&mut self) -> Result<Value, String> {
        let Some(t) = self.next() else {
            return Err("premature EOI".to_string());
        };
        match t.kind {
            Kind::LCurly => self.object(),
            Kind::LSquare => self.array(),
            Kind::Str => decode_string(&t.text).map(Value::String),
            Kind::Integer => Ok(integer(&t.text)),
            Kind::Float => float(&t.text),
            Kind::Keyword => match t.text.as_slice() {
                b"true" => Ok(Value::Bool(true)),
                b"false" => Ok(Value::Bool(false)),
                b"null" => Ok(Value::Null),
                other => Err(format!(
                    "invalid keyword '{}'",
                    String::from_utf8_lossy(other)
                )),
            },
            _ => Err("expecting value".to_string()),
        }
    }

    fn object(&mut self) -> Result<Value, String> {
        let mut map = Map::new();
        if self.peek().map(|t| t.kind) == Some(Kind::RCurly) {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            let key = match self.next() {
                None => return Err("premature EOI".to_string()),
                Some(t) if t.kind == Kind::Str => decode_string(&t.text)?,
                Some(_) => return Err("key is not a string in object".to_string()),
            };
            match self.next() {
                None => return Err("premature EOI".to_string()),
                Some(t) if t.kind == Kind::Colon => {}
                Some(_) => return Err("missing : in object pair".to_string()),
            }
            let value = self.value()?;
            if map.contains_key(&key) {
                return Err("duplicate key".to_string());
            }
            map.insert(key, value);
            match self.next().map(|t| t.kind) {
                None => return Err("premature EOI".to_string()),
                Some(Kind::RCurly) => return Ok(Value::Object(map)),
                Some(Kind::Comma) => {}
                Some(_) => return Err("expected separator in dict".to_string()),
            }
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        let mut list = Vec::new();
        if self.peek().map(|t| t.kind) == Some(Kind::RSquare) {
            self.pos += 1;
            return Ok(Value::Array(list));
        }
        loop {
            list.push(self.value()?);
            match self.next().map(|t| t.kind) {
                None => return Err("premature EOI".to_string()),
                Some(Kind::RSquare) => return Ok(Value::Array(list)),
                Some(Kind::Comma) => {}
                Some(_) => return Err("expected separator in list".to_string()),
            }
        }
    }
}

fn integer(text: &[u8]) -> Value {
    let s = String::from_utf8_lossy(text);
    if let Ok(n) = s.parse::<i64>() {
        return Value::Number(n.into());
    }
    if let Ok(n) = s.parse::<u64>() {
        return Value::Number(n.into());
    }
    // Out of 64-bit range: QEMU turns it into a float too.
    s.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

fn float(text: &[u8]) -> Result<Value, String> {
    let s = String::from_utf8_lossy(text);
    s.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map(Value::Number)
        .ok_or_else(|| format!("number '{s}' out of range"))
}

fn hex4(bytes: &[u8]) -> Option<u32> {
    if bytes.len() < 4 {
        return None;
    }
    let s = std::str::from_utf8(&bytes[..4]).ok()?;
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

const SURROGATE_HIGH: std::ops::RangeInclusive<u32> = 0xd800..=0xdbff;
const SURROGATE_LOW: std::ops::RangeInclusive<u32> = 0xdc00..=0xdfff;

/// Decode a string token (quotes included) into UTF-8.
fn decode_string(text: &[u8]) -> Result<String, String> {
    let inner = text.get(1..text.len().saturating_sub(1)).unwrap_or(&[]);
    let mut out: Vec<u8> = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let Some(&e) = inner.get(i + 1) else {
            return Err("invalid escape sequence in string".to_string());
        };
        i += 2;
        let c = match e {
            b'"' => '"',
            b'\'' => '\'',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let Some(mut cp) = hex4(&inner[i..]) else {
                    return Err("invalid hex escape sequence in string".to_string());
                };
                i += 4;
                if SURROGATE_HIGH.contains(&cp) {
                    let low = match inner.get(i..i + 2) {
                        Some(b"\\u") => hex4(&inner[i + 2..]),
                        _ => None,
                    };
                    match low {
                        Some(lo) if SURROGATE_LOW.contains(&lo) => {
                            i += 6;
                            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                        }
                        _ => return Err("missing low surrogate in string".to_string()),
                    }
                } else if SURROGATE_LOW.contains(&cp) {
                    return Err("stray low surrogate in string".to_string());
                }
                if cp == 0 {
                    return Err("\\u0000 is not supported".to_string());
                }
                char::from_u32(cp).ok_or("invalid \\u escape in string")?
            }
            _ => return Err("invalid escape sequence in string".to_string()),
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    String::from_utf8(out).map_err(|_| "invalid UTF-8 sequence in string".to_string())
}

/// Format `v` as QEMU's JSON writer does: `": "` and `", "` separators, ASCII only
/// (other characters as `\uXXXX`).
pub fn to_qemu_json(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

/// Append `v` formatted as [`to_qemu_json`] does.
pub fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(list) => {
            out.push('[');
            for (n, item) in list.iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (n, (k, item)) in map.iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                write_string(out, k);
                out.push_str(": ");
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

/// Append `s` as a JSON string literal, ASCII only.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn run(s: &mut JsonStreamer, data: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        s.feed(data, &mut out);
        out
    }

    fn values(data: &[u8]) -> Vec<Message> {
        run(&mut JsonStreamer::new(1 << 20), data)
    }

    fn is_err(m: &Message) -> bool {
        matches!(m, Message::Error(_))
    }

    #[test]
    fn splits_merged_and_joins_split_messages() {
        let mut s = JsonStreamer::new(1024);
        let out = run(&mut s, b"{\"a\": 1}{\"b\": [1, 2.5, -3e2]}\r\n");
        assert_eq!(
            out,
            vec![
                Message::Value(json!({"a": 1})),
                Message::Value(json!({"b": [1, 2.5, -300.0]}))
            ]
        );
        let whole = b"{\"execute\": \"query-status\", \"id\": \"x\\\"y\"}";
        let mut got = Vec::new();
        for b in whole {
            got.extend(run(&mut s, &[*b]));
        }
        assert_eq!(
            got,
            vec![Message::Value(
                json!({"execute": "query-status", "id": "x\"y"})
            )]
        );
        assert!(s.is_idle());
    }

    #[test]
    fn single_quotes_escapes_and_keywords() {
        assert_eq!(
            values(b"{'a': \"it's\", 'b': 'say \"hi\"', 'c': [true, false, null]}"),
            vec![Message::Value(
                json!({"a": "it's", "b": "say \"hi\"", "c": [true, false, null]})
            )]
        );
        assert_eq!(
            values(b"\"\\u00e9\\ud83d\\ude00\\n\\/\""),
            vec![Message::Value(json!("\u{e9}\u{1f600}\n/"))]
        );
        // A top-level scalar ends at the next delimiter.
        assert_eq!(values(b"12 "), vec![Message::Value(json!(12))]);
        assert_eq!(
            values(b"18446744073709551615 "),
            vec![Message::Value(json!(18446744073709551615u64))]
        );
        assert!(is_err(&values(b"nope ")[0]));
        assert!(is_err(&values(b"{\"a\": 1, \"a\": 2}")[0]));
        assert!(is_err(&values(b"\"\\u0000\"")[0]));
        assert!(is_err(&values(b"\"\\ud800\"")[0]));
        assert!(is_err(&values(b"\"\xc3\x28\"")[0]));
    }

    /// The sequences of QEMU's qmp-test `test_malformed`: each gives exactly one error and
    /// the next good message parses.
    #[test]
    fn qmp_test_recovery_sequences() {
        let good = b"{ 'execute': 'no-such-cmd' }";
        let cases: &[&[u8]] = &[
            b"{]\n",
            b"{\xff",
            b"{\x01",
            b"{'bad \xff",
            b"{'execute': 'nonexistent', 'id':'\n",
            b"%p",
        ];
        for case in cases {
            let mut s = JsonStreamer::new(4096);
            let out = run(&mut s, case);
            assert_eq!(out.len(), 1, "case {case:?}: {out:?}");
            assert!(is_err(&out[0]));
            let out = run(&mut s, good);
            assert_eq!(
                out,
                vec![Message::Value(json!({"execute": "no-such-cmd"}))],
                "after {case:?}"
            );
        }
    }

    #[test]
    fn error_texts_follow_qemu() {
        assert_eq!(
            values(b"{\xff"),
            vec![Message::Error("JSON parse error, stray '\u{fffd}'".into())]
        );
        assert_eq!(
            values(b"}"),
            vec![Message::Error("JSON parse error, expecting value".into())]
        );
        assert_eq!(
            values(b"{1: 2}"),
            vec![Message::Error(
                "JSON parse error, key is not a string in object".into()
            )]
        );
    }

    #[test]
    fn oversized_message_is_one_error_then_skipped() {
        let mut s = JsonStreamer::new(64);
        let big = format!(
            "{{\"execute\": \"x\", \"arguments\": {{\"data\": \"{}\", \"l\": [1, {{}}]}}}}",
            "A".repeat(500)
        );
        let out = run(&mut s, big.as_bytes());
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Message::Error(e) if e.contains("limit of 64 bytes")));
        assert_eq!(
            run(&mut s, b"{\"execute\": \"ok\"}"),
            vec![Message::Value(json!({"execute": "ok"}))]
        );
        // A huge top-level string too.
        let out = run(&mut s, format!("\"{}\" [1]", "B".repeat(300)).as_bytes());
        assert_eq!(out.len(), 2);
        assert!(is_err(&out[0]));
        assert_eq!(out[1], Message::Value(json!([1])));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut s = JsonStreamer::new(1 << 20);
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        let out = run(&mut s, deep.as_bytes());
        assert_eq!(out.len(), 1);
        assert!(is_err(&out[0]));
        assert_eq!(run(&mut s, b"[[1]]"), vec![Message::Value(json!([[1]]))]);
    }

    #[test]
    fn writer_matches_qemu_style() {
        let v = json!({"a": [1, "x\u{e9}\n"], "b": {}, "c": null, "d": 1.5});
        assert_eq!(
            to_qemu_json(&v),
            "{\"a\": [1, \"x\\u00E9\\n\"], \"b\": {}, \"c\": null, \"d\": 1.5}"
        );
        assert_eq!(to_qemu_json(&json!("\u{1f600}")), "\"\\uD83D\\uDE00\"");
        // What the writer writes, the streamer reads back.
        let text = to_qemu_json(&v);
        assert_eq!(values(text.as_bytes()), vec![Message::Value(v)]);
    }

    proptest! {
        #[test]
        fn never_panics_and_stays_bounded(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut s = JsonStreamer::new(256);
            for c in &chunks {
                let mut out = Vec::new();
                s.feed(c, &mut out);
                prop_assert!(s.held + s.token.len() <= 256);
            }
            // After a resync byte and a good message, the streamer always recovers.
            let mut out = Vec::new();
            s.feed(b"\x01{\"execute\": \"x\"}", &mut out);
            prop_assert_eq!(out.last(), Some(&Message::Value(json!({"execute": "x"}))));
        }

        #[test]
        fn roundtrips_generated_values(v in arb_json()) {
            let text = to_qemu_json(&v);
            let mut s = JsonStreamer::new(1 << 20);
            let mut out = Vec::new();
            s.feed(text.as_bytes(), &mut out);
            s.feed(b" ", &mut out);
            prop_assert_eq!(out, vec![Message::Value(v)]);
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            "[^\u{0}]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
