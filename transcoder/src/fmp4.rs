//! The few facts of fragmented MP4 files the CMAF manifests need, read from the files
//! FFmpeg wrote (not from what we asked the encoder for): a track's timescale, edit and
//! RFC 6381 codec string from the init segment; each media segment's start and duration.
//!
//! Only the boxes on those paths are read (ISO/IEC 14496-12 and -15, AV1-ISOBMFF); any
//! short or malformed box is an error, never a panic.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

use anyhow::{Context as _, bail};

/// A box type, e.g. `*b"moov"`.
type FourCc = [u8; 4];

/// The boxes directly inside `data`: `(type, payload)`.
fn boxes(data: &[u8]) -> impl Iterator<Item = anyhow::Result<(FourCc, &[u8])>> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let size = u64::from(be_u32(rest, 0)?);
            let kind: FourCc = rest
                .get(4..8)
                .context("truncated box header")?
                .try_into()
                .expect("four bytes");
            let (header, size) = match size {
                0 => (8, rest.len() as u64),
                1 => (16, be_u64(rest, 8)?),
                n => (8, n),
            };
            let size = usize::try_from(size).context("box size")?;
            if size < header || size > rest.len() {
                bail!("box `{}` of {size} bytes overruns its parent", name(kind));
            }
            let payload = &rest[header..size];
            rest = &rest[size..];
            Ok((kind, payload))
        })();
        if parsed.is_err() {
            rest = &[];
        }
        Some(parsed)
    })
}

/// The payload of the first box along `path` (e.g. `moov`, `trak`, `mdia`, `mdhd`).
fn find<'a>(data: &'a [u8], path: &[&FourCc]) -> anyhow::Result<Option<&'a [u8]>> {
    let Some((first, rest)) = path.split_first() else {
        return Ok(Some(data));
    };
    for b in boxes(data) {
        let (kind, payload) = b?;
        if kind == **first {
            return find(payload, rest);
        }
    }
    Ok(None)
}

/// [`find`], or an error naming the missing box.
fn need<'a>(data: &'a [u8], path: &[&FourCc]) -> anyhow::Result<&'a [u8]> {
    find(data, path)?.with_context(|| {
        let names: Vec<String> = path.iter().map(|k| name(**k)).collect();
        format!("no `{}` box", names.join("/"))
    })
}

fn name(kind: FourCc) -> String {
    String::from_utf8_lossy(&kind).into_owned()
}

fn be_u32(data: &[u8], at: usize) -> anyhow::Result<u32> {
    let bytes = data.get(at..at + 4).context("truncated box")?;
    Ok(u32::from_be_bytes(bytes.try_into().expect("four bytes")))
}

fn be_u64(data: &[u8], at: usize) -> anyhow::Result<u64> {
    let bytes = data.get(at..at + 8).context("truncated box")?;
    Ok(u64::from_be_bytes(bytes.try_into().expect("eight bytes")))
}

fn byte(data: &[u8], at: usize) -> anyhow::Result<u8> {
    data.get(at).copied().context("truncated box")
}

/// What an init segment says about its (single) track.
#[derive(Debug, Clone, PartialEq)]
pub struct InitInfo {
    /// Ticks per second of the track's media timeline.
    pub timescale: u32,
    /// Media time shown first (the edit list's first non-empty edit; 0 without one):
    /// the encoder's reordering delay or the AAC priming, which the DASH MPD states as
    /// `presentationTimeOffset` so both manifests start the track at the same instant.
    pub media_time: i64,
    /// RFC 6381 codec string of the sample entry, e.g. `avc1.64001f`, `mp4a.40.2`.
    pub codec: String,
}

/// Reads an init segment (`ftyp` + `moov` of one track).
pub fn read_init(data: &[u8]) -> anyhow::Result<InitInfo> {
    track_info(need(data, &[b"moov", b"trak"])?)
}

/// The codec strings of every track of the MP4 file at `path`, comma separated in track
/// order (e.g. `avc1.64001f,mp4a.40.2`). Reads box headers up to the `moov` and the
/// `moov` itself, not the media: the file's index must come first (faststart), as the
/// transcoder writes it.
pub fn file_codecs(path: &Path) -> anyhow::Result<String> {
    /// A `moov` larger than this is not one the transcoder wrote.
    const MOOV_MAX: u64 = 64 << 20;
    let mut file = std::fs::File::open(path)?;
    loop {
        let mut head = [0u8; 8];
        file.read_exact(&mut head)
            .context("no `moov` box before the end of the file")?;
        let mut size = u64::from(be_u32(&head, 0)?);
        let kind: FourCc = head[4..8].try_into().expect("four bytes");
        let mut header = 8;
        if size == 1 {
            file.read_exact(&mut head)?;
            size = be_u64(&head, 0)?;
            header = 16;
        }
        if size < header {
            bail!("a top-level box of {size} bytes");
        }
        if &kind == b"mdat" || size == 0 {
            bail!("the media comes before the `moov` box");
        }
        if &kind == b"moov" {
            if size > MOOV_MAX {
                bail!("a `moov` box of {size} bytes");
            }
            let mut moov = vec![0u8; (size - header) as usize];
            file.read_exact(&mut moov)?;
            let mut codecs = Vec::new();
            for b in boxes(&moov) {
                let (kind, payload) = b?;
                if &kind == b"trak" {
                    codecs.push(track_info(payload)?.codec);
                }
            }
            return Ok(codecs.join(","));
        }
        file.seek(SeekFrom::Current(i64::try_from(size - header)?))?;
    }
}

/// One `trak` box's facts.
fn track_info(trak: &[u8]) -> anyhow::Result<InitInfo> {
    let mdhd = need(trak, &[b"mdia", b"mdhd"])?;
    let timescale = match byte(mdhd, 0)? {
        1 => be_u32(mdhd, 20)?,
        _ => be_u32(mdhd, 12)?,
    };
    if timescale == 0 {
        bail!("the track's timescale is 0");
    }
    let media_time = match find(trak, &[b"edts", b"elst"])? {
        Some(elst) => first_edit(elst)?,
        None => 0,
    };
    let stsd = need(trak, &[b"mdia", b"minf", b"stbl", b"stsd"])?;
    // Full box header and entry count, then the sample entries.
    let (kind, entry) = boxes(stsd.get(8..).context("truncated stsd")?)
        .next()
        .context("no sample entry")??;
    Ok(InitInfo {
        timescale,
        media_time,
        codec: codec_string(kind, entry)?,
    })
}

/// The media time of the edit list's first non-empty edit (an empty edit, media time
/// -1, only delays the track).
fn first_edit(elst: &[u8]) -> anyhow::Result<i64> {
    let v1 = byte(elst, 0)? == 1;
    let count = be_u32(elst, 4)? as usize;
    let entry = if v1 { 20 } else { 12 };
    for i in 0..count.min(16) {
        let at = 8 + i * entry;
        let media_time = if v1 {
            be_u64(elst, at + 8)? as i64
        } else {
            i64::from(be_u32(elst, at + 4)? as i32)
        };
        if media_time != -1 {
            return Ok(media_time);
        }
    }
    Ok(0)
}

/// The RFC 6381 string of a sample entry, from its decoder configuration box.
fn codec_string(kind: FourCc, entry: &[u8]) -> anyhow::Result<String> {
    // Sample entry fields before the child boxes: visual 78 bytes, audio 28.
    let children = |skip: usize| entry.get(skip..).context("truncated sample entry");
    match &kind {
        b"avc1" | b"avc3" => {
            let avcc = need(children(78)?, &[b"avcC"])?;
            Ok(format!(
                "{}.{:02x}{:02x}{:02x}",
                name(kind),
                byte(avcc, 1)?,
                byte(avcc, 2)?,
                byte(avcc, 3)?
            ))
        }
        b"hvc1" | b"hev1" => hevc_string(kind, need(children(78)?, &[b"hvcC"])?),
        b"av01" => av1_string(need(children(78)?, &[b"av1C"])?),
        b"mp4a" => {
            let esds = need(children(28)?, &[b"esds"])?;
            Ok(format!("mp4a.40.{}", aac_object_type(esds)?))
        }
        _ => bail!("unexpected sample entry `{}`", name(kind)),
    }
}

/// `hvc1.<space><profile>.<compat>.<tier><level>.<constraints>` (ISO/IEC 14496-15 E.3).
fn hevc_string(kind: FourCc, hvcc: &[u8]) -> anyhow::Result<String> {
    let b1 = byte(hvcc, 1)?;
    let space = ["", "A", "B", "C"][usize::from(b1 >> 6)];
    let tier = if b1 & 0x20 != 0 { 'H' } else { 'L' };
    // The compatibility flags are written bit-reversed, in hex without leading zeros.
    let compat = be_u32(hvcc, 2)?.reverse_bits();
    let constraints = hvcc.get(6..12).context("truncated hvcC")?;
    let kept = constraints.len() - constraints.iter().rev().take_while(|b| **b == 0).count();
    let mut out = format!(
        "{}.{space}{}.{compat:X}.{tier}{}",
        name(kind),
        b1 & 0x1f,
        byte(hvcc, 12)?
    );
    for b in &constraints[..kept.max(1)] {
        out.push_str(&format!(".{b:X}"));
    }
    Ok(out)
}

/// `av01.<profile>.<level><tier>.<bit depth>` (AV1-ISOBMFF, "Codecs Parameter String").
fn av1_string(av1c: &[u8]) -> anyhow::Result<String> {
    let (b1, b2) = (byte(av1c, 1)?, byte(av1c, 2)?);
    let tier = if b2 & 0x80 != 0 { 'H' } else { 'M' };
    let depth = match (b2 & 0x40 != 0, b2 & 0x20 != 0) {
        (true, true) => 12,
        (true, false) => 10,
        _ => 8,
    };
    Ok(format!(
        "av01.{}.{:02}{tier}.{depth:02}",
        b1 >> 5,
        b1 & 0x1f
    ))
}

/// The audio object type of an `esds` box's AudioSpecificConfig (2 = AAC-LC).
fn aac_object_type(esds: &[u8]) -> anyhow::Result<u8> {
    // Descriptors (tag, length in 7-bit groups, body) after the full box header:
    // ES_Descriptor (3) holds DecoderConfigDescriptor (4) holds DecoderSpecificInfo (5).
    let mut data = esds.get(4..).context("truncated esds")?;
    loop {
        let tag = byte(data, 0)?;
        let (mut len, mut at) = (0usize, 1);
        loop {
            let b = byte(data, at)?;
            len = (len << 7) | usize::from(b & 0x7f);
            at += 1;
            if b & 0x80 == 0 || at > 4 {
                break;
            }
        }
        let body = data.get(at..at + len).context("truncated descriptor")?;
        data = match tag {
            // ES_ID, flags (no optional fields are written by FFmpeg's muxer).
            3 => body.get(3..).context("truncated ES descriptor")?,
            // Object type, stream type, buffer size, max and average bit rate.
            4 => body.get(13..).context("truncated decoder config")?,
            5 => return Ok(byte(body, 0)? >> 3),
            _ => bail!("unexpected descriptor {tag} in esds"),
        };
    }
}

/// One media segment's place on its track's timeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fragment {
    /// Presentation time of its first sample, media timeline ticks (decode time plus
    /// that sample's composition offset: where a player places it).
    pub start: i64,
    /// Its duration in ticks (the segment index's subsegment durations).
    pub duration: u64,
    /// Whether its first sample is a sync sample (a keyframe: IDR for H.264).
    pub starts_with_sync: bool,
}

/// Reads a media segment (`styp`, `sidx`, `moof`, `mdat`) as FFmpeg's fMP4 HLS muxer
/// writes it.
pub fn read_fragment(data: &[u8]) -> anyhow::Result<Fragment> {
    let sidx = need(data, &[b"sidx"])?;
    let v1 = byte(sidx, 0)? == 1;
    let refs_at = if v1 { 28 } else { 20 };
    let count = usize::from(u16::from_be_bytes([
        byte(sidx, refs_at + 2)?,
        byte(sidx, refs_at + 3)?,
    ]));
    let mut duration = 0u64;
    for i in 0..count {
        duration += u64::from(be_u32(sidx, refs_at + 4 + i * 12 + 4)?);
    }
    let traf = need(data, &[b"moof", b"traf"])?;
    let tfdt = need(traf, &[b"tfdt"])?;
    let decode = if byte(tfdt, 0)? == 1 {
        be_u64(tfdt, 4)? as i64
    } else {
        i64::from(be_u32(tfdt, 4)?)
    };
    let tfhd = need(traf, &[b"tfhd"])?;
    let trun = need(traf, &[b"trun"])?;
    let first = first_sample(tfhd, trun)?;
    Ok(Fragment {
        start: decode + first.composition_offset,
        duration,
        starts_with_sync: first.flags & NON_SYNC == 0,
    })
}

/// `sample_is_non_sync_sample` in a sample's flags.
const NON_SYNC: u32 = 0x0001_0000;

struct FirstSample {
    flags: u32,
    composition_offset: i64,
}

/// The first sample's flags and composition offset, from the track run (or the track
/// fragment's defaults).
fn first_sample(tfhd: &[u8], trun: &[u8]) -> anyhow::Result<FirstSample> {
    let tf_flags = be_u32(tfhd, 0)? & 0x00ff_ffff;
    // track_ID, then the optional fields in order.
    let mut at = 8;
    for (bit, len) in [(0x01, 8), (0x02, 4), (0x08, 4), (0x10, 4)] {
        if tf_flags & bit != 0 {
            at += len;
        }
    }
    let default_flags = if tf_flags & 0x20 != 0 {
        be_u32(tfhd, at)?
    } else {
        0
    };
    let word = be_u32(trun, 0)?;
    let (v1, flags) = (word >> 24 == 1, word & 0x00ff_ffff);
    if be_u32(trun, 4)? == 0 {
        bail!("a track run without samples");
    }
    let mut at = 8;
    if flags & 0x01 != 0 {
        at += 4; // data offset
    }
    let mut first_flags = default_flags;
    if flags & 0x04 != 0 {
        first_flags = be_u32(trun, at)?;
        at += 4;
    }
    if flags & 0x100 != 0 {
        at += 4; // duration
    }
    if flags & 0x200 != 0 {
        at += 4; // size
    }
    if flags & 0x400 != 0 {
        if flags & 0x04 == 0 {
            first_flags = be_u32(trun, at)?;
        }
        at += 4;
    }
    let composition_offset = if flags & 0x800 != 0 {
        let raw = be_u32(trun, at)?;
        if v1 {
            i64::from(raw as i32)
        } else {
            i64::from(raw)
        }
    } else {
        0
    };
    Ok(FirstSample {
        flags: first_flags,
        composition_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A box of `kind` around `payload`.
    fn mk(kind: &FourCc, payload: &[u8]) -> Vec<u8> {
        let mut b = u32::try_from(payload.len() + 8)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        b.extend(kind);
        b.extend(payload);
        b
    }

    #[test]
    fn nested_boxes_are_found_and_overruns_refused() {
        let inner = mk(b"mdhd", &[1, 2, 3]);
        let data = mk(b"moov", &mk(b"trak", &inner));
        assert_eq!(
            find(&data, &[b"moov", b"trak", b"mdhd"]).unwrap(),
            Some(&[1u8, 2, 3][..])
        );
        assert_eq!(find(&data, &[b"moov", b"edts"]).unwrap(), None);
        let mut bad = data.clone();
        bad[3] = 200; // the moov claims more bytes than there are
        assert!(find(&bad, &[b"moov", b"trak"]).is_err());
    }

    /// A media segment of one track run: `trun_flags` and its optional fields after the
    /// sample count, tfhd's default sample flags, decode time 1000, 512 ticks long.
    fn segment(default_flags: u32, trun_flags: u32, trun_fields: &[u32]) -> Vec<u8> {
        let be = |v: u32| v.to_be_bytes();
        let mut sidx = vec![0, 0, 0, 0];
        for v in [1, 12_800, 0, 0] {
            sidx.extend(be(v));
        }
        sidx.extend([0, 0, 0, 1]); // reserved, one reference
        for v in [100, 512, 0x9000_0000] {
            sidx.extend(be(v));
        }
        let mut tfhd = be(0x0002_0020).to_vec(); // default-base-is-moof, default flags
        tfhd.extend(be(1));
        tfhd.extend(be(default_flags));
        let mut tfdt = be(0x0100_0000).to_vec();
        tfdt.extend(1000u64.to_be_bytes());
        let mut trun = be(trun_flags).to_vec();
        trun.extend(be(1));
        for f in trun_fields {
            trun.extend(be(*f));
        }
        let traf = [mk(b"tfhd", &tfhd), mk(b"tfdt", &tfdt), mk(b"trun", &trun)].concat();
        [
            mk(b"styp", b"msdh"),
            mk(b"sidx", &sidx),
            mk(b"moof", &mk(b"traf", &traf)),
            mk(b"mdat", &[0; 4]),
        ]
        .concat()
    }

    #[test]
    fn a_fragment_states_its_start_length_and_whether_it_starts_on_a_keyframe() {
        const NON_SYNC_DEFAULT: u32 = 0x0101_0000;
        // First-sample flags (sync) override the non-sync default; version 1 run with a
        // negative composition offset.
        let f = read_fragment(&segment(
            NON_SYNC_DEFAULT,
            0x0100_0805,
            &[8, 0x0200_0000, (-24i32) as u32],
        ))
        .unwrap();
        assert_eq!((f.start, f.duration, f.starts_with_sync), (976, 512, true));
        // No first-sample flags: the default says non-sync.
        let f = read_fragment(&segment(NON_SYNC_DEFAULT, 0x0000_0001, &[8])).unwrap();
        assert!(!f.starts_with_sync);
        assert_eq!(f.start, 1000);
        // Per-sample flags (duration, size, flags) also name the first sample.
        let f = read_fragment(&segment(0, 0x0000_0701, &[8, 40, 100, 0x0001_0000])).unwrap();
        assert!(!f.starts_with_sync);
        // A run that claims more fields than it has is an error, not a panic.
        assert!(read_fragment(&segment(0, 0x0000_0f05, &[8])).is_err());
    }

    #[test]
    fn hevc_and_av1_strings_follow_their_specs() {
        // Main profile, compat flags 0x60000000, level 93 (3.1), constraint byte 0x90.
        let mut hvcc = vec![1, 0x01, 0x60, 0, 0, 0, 0x90, 0, 0, 0, 0, 0, 93];
        hvcc.extend([0; 10]);
        assert_eq!(hevc_string(*b"hvc1", &hvcc).unwrap(), "hvc1.1.6.L93.90");
        // Main profile, level 5.1 (idx 13), Main tier, 8-bit.
        assert_eq!(av1_string(&[0x81, 13, 0x0c, 0]).unwrap(), "av01.0.13M.08");
        // 10-bit, High tier.
        assert_eq!(av1_string(&[0x81, 8, 0xc0, 0]).unwrap(), "av01.0.08H.10");
    }
}
