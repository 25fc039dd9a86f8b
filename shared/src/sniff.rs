//! What an upload's first bytes say it is, without FFmpeg: the text formats that name
//! other files (playlists, manifests, concat lists) and are never a video.
//!
//! FFmpeg demuxers such as `hls`, `dash` and `concat` open the files and URLs a source
//! lists, which on an upload service discloses other files (another customer's upload, any
//! local file with a video extension). The workers refuse every demuxer outside an
//! allow-list (`media::admit`); this module lets both them and the producer, which does
//! not link FFmpeg, say *why* in words a person can act on, and lets the producer refuse
//! such a file before it is stored.

/// How many leading bytes [`refusal`] looks at.
pub const SNIFF_BYTES: usize = 4096;

/// The reason an upload that starts with `head` is not a video, when its first bytes
/// show it is a list of other files; `None` when they do not (FFmpeg then decides).
pub fn refusal(head: &[u8]) -> Option<String> {
    let text = leading_text(head)?;
    let lower = text.to_ascii_lowercase();
    let first_line = lower.lines().next().unwrap_or("").trim();
    let kind = if first_line.starts_with("#extm3u") || lower.contains("#ext-x-") {
        "an HLS playlist (.m3u8)"
    } else if lower.contains("<mpd") {
        "a DASH manifest (.mpd)"
    } else if first_line.starts_with("ffconcat")
        || lower.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with("file '") || l.starts_with("file \"") || l.starts_with("file file:")
        })
    {
        "an FFmpeg concat list"
    } else if lower.contains("<smil") {
        "a SMIL playlist"
    } else if first_line.starts_with("[playlist]") || first_line.starts_with("#extinf") {
        "a playlist"
    } else if lower.contains("<smoothstreamingmedia") {
        "a Smooth Streaming manifest"
    } else if first_line.starts_with("<?xml") || first_line.starts_with("<!doctype") {
        "an XML or HTML document"
    } else {
        return None;
    };
    Some(format!(
        "source is {kind}, not a video: it names other files, which vidpipe never opens; \
         upload the video file itself"
    ))
}

/// The start of `head` as text, when it is text: UTF-8 (a BOM allowed) with no NUL and
/// few control characters. Binary containers (MP4, Matroska, MPEG-TS, …) never pass.
fn leading_text(head: &[u8]) -> Option<&str> {
    let head = &head[..head.len().min(SNIFF_BYTES)];
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    // A multi-byte character cut at the end of the window is still text.
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok()?,
        Err(_) => return None,
    };
    let control = text
        .bytes()
        .filter(|b| b.is_ascii_control() && !matches!(b, b'\n' | b'\r' | b'\t'))
        .count();
    (control == 0).then_some(text.trim_start())
}

/// Reads the first [`SNIFF_BYTES`] of a file and returns its [`refusal`], if any.
pub fn refusal_of_file(path: &std::path::Path) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    std::fs::File::open(path)?
        .take(SNIFF_BYTES as u64)
        .read_to_end(&mut head)?;
    Ok(refusal(&head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_of_other_files_are_named() {
        let cases: [(&[u8], &str); 7] = [
            (
                b"#EXTM3U\n#EXTINF:10,\nfile:///etc/x.ts\n",
                "an HLS playlist",
            ),
            (b"\xEF\xBB\xBF#EXTM3U\r\n", "an HLS playlist"),
            (
                b"<?xml version=\"1.0\"?>\n<MPD xmlns=\"urn:mpeg:dash:schema:mpd:2011\">",
                "a DASH manifest",
            ),
            (
                b"ffconcat version 1.0\nfile 'a.mp4'\n",
                "an FFmpeg concat list",
            ),
            (b"file '../other/source.mp4'\n", "an FFmpeg concat list"),
            (b"<smil><body/></smil>", "a SMIL playlist"),
            (b"[playlist]\nFile1=x.mp4\n", "a playlist"),
        ];
        for (head, kind) in cases {
            let reason = refusal(head).unwrap_or_default();
            assert!(reason.contains(kind), "{head:?}: `{reason}`");
            assert!(reason.contains("upload the video file itself"));
        }
    }

    #[test]
    fn binary_containers_and_plain_text_are_left_to_ffmpeg() {
        let mp4 = b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2avc1mp41";
        assert_eq!(refusal(mp4), None);
        let mkv = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01";
        assert_eq!(refusal(mkv), None);
        let ts = [0x47u8, 0x40, 0x00, 0x10, 0x00, 0x00, 0xb0, 0x0d];
        assert_eq!(refusal(&ts), None);
        assert_eq!(refusal(b"not a video\nnot a video\n"), None);
        assert_eq!(refusal(b""), None);
    }
}
