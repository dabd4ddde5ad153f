//! Fuzz target `qmp_session`: arbitrary bytes from a monitor client, in arbitrary chunks, into a QMP session
//! (JSON streaming parser, greeting/capabilities state, request checks) and into the human
//! monitor's line editor.
//!
//! Nothing may panic, and every reply the session writes by itself is one line of valid JSON.

use monitor::hmp::LineEditor;
use monitor::protocol::{Incoming, QmpError, Session};

/// Largest message the session takes (small, so the limit is reached too).
const MAX_MESSAGE: usize = 4096;

/// Runs one input (see the module docs).
pub fn qmp_session(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut session = Session::new(MAX_MESSAGE);
    let mut editor = LineEditor::new();
    for part in rest.chunks(chunk) {
        for incoming in session.feed(part) {
            let line = match incoming {
                Incoming::Reply(line) => line,
                Incoming::Execute(req) => session.answer(
                    req.id.as_ref(),
                    &Err(QmpError::command_not_found(format!(
                        "The command {} has not been found",
                        req.execute
                    ))),
                ),
            };
            let text = line.trim_end();
            assert!(!text.contains('\n'), "reply of several lines: {text:?}");
            serde_json::from_str::<serde_json::Value>(text).expect("reply is JSON");
        }
        let _ = editor.feed(part);
    }
}
