//! The integration tests' own task kind, outside the builtin registry: shared by the test
//! worker (which registers it through its message type, as a real worker crate would) and
//! the tests (which add it to their topology to publish to it and clean it up).

use shared::tasks::TaskKind;

/// `copy`: copies its source to `out.txt`. It needs no video, so any bytes are a source.
pub const COPY: TaskKind = TaskKind {
    name: "copy",
    message: "CopyJob",
    needs_video: false,
    fans_out: false,
    role: "testworker",
};
