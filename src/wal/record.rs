//! The record frame: how one record is laid out in a segment, and how a scan
//! tells a whole record from a damaged or missing one.
//!
//! ```text
//! offset  size  field
//!      0     4  len: u32 LE. Bits 0..=30: the body length (8 + payload
//!               length). Bit 31: this record starts a commit.
//!      4     4  crc: CRC32C (Castagnoli) of the len word, the index and the
//!               payload, in that order.
//!      8     8  index: u64 LE, given by the caller (a slot, or 0).
//!     16     n  payload.
//!   16+n   0-7  zero padding to the next multiple of 8.
//! ```
//!
//! A body is at least 8 bytes (the index), so a len word of 0 never starts a
//! record: it is what a preallocated, never-written region reads as, and
//! marks the end of the log. The CRC covers the len word too, so a damaged
//! length, or a damaged start-of-commit bit, is caught like damaged data.
//! Padding keeps every frame 8-aligned, which lets the search for records
//! after a damaged one (see [`find_after`]) look at one offset in eight; it
//! is not covered by the CRC, since nothing is read from it.

/// Bytes before the payload: len word, crc, index.
pub(super) const FRAME_HEADER: usize = 16;
/// Every frame starts at a multiple of this.
pub(super) const ALIGN: usize = 8;
/// Bit 31 of the len word: the record is the first of a commit.
const START_OF_COMMIT: u32 = 1 << 31;
/// The body-length bits of the len word.
const BODY_MASK: u32 = !START_OF_COMMIT;
/// The smallest body: an index and an empty payload.
const MIN_BODY: u32 = 8;

/// Bytes one record with a payload of `payload_len` bytes takes on disk,
/// padding included.
pub(super) fn frame_len(payload_len: usize) -> usize {
    (FRAME_HEADER + payload_len).next_multiple_of(ALIGN)
}

/// Appends the frame of one record to `buf`, which must end 8-aligned
/// relative to the segment (it always does: every frame is padded).
pub(super) fn encode(buf: &mut Vec<u8>, index: u64, payload: &[u8], starts_commit: bool) {
    // The caller bounds payloads by the segment size, which is at most
    // 1 GiB, so the body length fits the 31 bits the len word has for it.
    let body = MIN_BODY as usize + payload.len();
    assert!(body <= BODY_MASK as usize, "record body of {body} bytes");
    let mut len_word = body as u32;
    if starts_commit {
        len_word |= START_OF_COMMIT;
    }
    let start = buf.len();
    assert!(
        start.is_multiple_of(ALIGN),
        "frame would start unaligned at {start}"
    );
    let len_bytes = len_word.to_le_bytes();
    let index_bytes = index.to_le_bytes();
    let crc = checksum(len_bytes, index_bytes, payload);
    buf.extend_from_slice(&len_bytes);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(&index_bytes);
    buf.extend_from_slice(payload);
    buf.resize(start + frame_len(payload.len()), 0);
}

fn checksum(len_bytes: [u8; 4], index_bytes: [u8; 8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&len_bytes);
    let crc = crc32c::crc32c_append(crc, &index_bytes);
    crc32c::crc32c_append(crc, payload)
}

/// One whole record found in a segment's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Frame {
    /// Where the frame starts in the segment.
    pub offset: usize,
    /// Bytes the frame takes, padding included; the next frame starts at
    /// `offset + len`.
    pub len: usize,
    pub index: u64,
    /// Where the payload lies in the segment's bytes.
    pub payload: std::ops::Range<usize>,
    pub starts_commit: bool,
}

/// What is at an offset where a frame should start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Parsed {
    /// A whole record.
    Frame(Frame),
    /// A len word of 0: nothing was ever written here (or it was zeroed).
    Empty,
    /// Something that is not a whole record; the reason, for messages.
    Bad(&'static str),
}

/// Reads the frame at `offset` of `seg`, the whole bytes of a segment.
/// Never allocates: lengths are checked against the bytes that are there,
/// so a damaged length cannot make a scan read past the segment.
pub(super) fn parse(seg: &[u8], offset: usize) -> Parsed {
    assert!(
        offset.is_multiple_of(ALIGN),
        "parse at unaligned offset {offset}"
    );
    let Some(header) = seg.get(offset..offset + FRAME_HEADER) else {
        // Fewer than 16 bytes left: a frame cannot start here. Zeros are
        // the unwritten end of a segment whose size is not a multiple of
        // 16; anything else is the start of a frame cut short.
        return if seg[offset.min(seg.len())..].iter().all(|b| *b == 0) {
            Parsed::Empty
        } else {
            Parsed::Bad("record header cut short by the end of the segment")
        };
    };
    let len_bytes: [u8; 4] = [header[0], header[1], header[2], header[3]];
    let len_word = u32::from_le_bytes(len_bytes);
    if len_word == 0 {
        return Parsed::Empty;
    }
    let body = len_word & BODY_MASK;
    if body < MIN_BODY {
        return Parsed::Bad("record length shorter than its index");
    }
    let payload_len = (body - MIN_BODY) as usize;
    let len = frame_len(payload_len);
    // `offset + len` cannot overflow: `len` is below 2^31 + 24 and `offset`
    // is within a slice.
    if offset + len > seg.len() {
        return Parsed::Bad("record length runs past the end of the segment");
    }
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let index_bytes: [u8; 8] = [
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ];
    let payload = offset + FRAME_HEADER..offset + FRAME_HEADER + payload_len;
    if checksum(len_bytes, index_bytes, &seg[payload.clone()]) != crc {
        return Parsed::Bad("record checksum mismatch");
    }
    Parsed::Frame(Frame {
        offset,
        len,
        index: u64::from_le_bytes(index_bytes),
        payload,
        starts_commit: len_word & START_OF_COMMIT != 0,
    })
}

/// The whole records that lie after a point where the scan had to stop
/// (`stop`, the start of a damaged or empty frame), found by trying every
/// aligned offset after it and jumping over each record found, so bytes
/// inside a record's payload are never mistaken for records.
///
/// A false find needs a length that fits and a CRC32C that matches by
/// chance, about 1 in 2^32 per offset tried with a nonzero length.
pub(super) fn find_after(seg: &[u8], stop: usize) -> Vec<Frame> {
    assert!(
        stop.is_multiple_of(ALIGN),
        "search from unaligned offset {stop}"
    );
    let mut found = Vec::new();
    let mut offset = stop + ALIGN;
    while offset + FRAME_HEADER <= seg.len() {
        match parse(seg, offset) {
            Parsed::Frame(frame) => {
                offset += frame.len;
                found.push(frame);
            }
            Parsed::Empty | Parsed::Bad(_) => offset += ALIGN,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(index: u64, payload: &[u8], starts_commit: bool) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(&mut buf, index, payload, starts_commit);
        buf
    }

    #[test]
    fn frames_are_padded_to_eight() {
        assert_eq!(frame_len(0), 16);
        assert_eq!(frame_len(1), 24);
        assert_eq!(frame_len(8), 24);
        assert_eq!(frame_len(9), 32);
        for n in 0..40 {
            assert_eq!(one(1, &vec![7; n], true).len(), frame_len(n));
        }
    }

    #[test]
    fn round_trip_of_one_frame() {
        let buf = one(42, b"hello", true);
        let Parsed::Frame(frame) = parse(&buf, 0) else {
            panic!("not a frame: {:?}", parse(&buf, 0));
        };
        assert_eq!(frame.index, 42);
        assert_eq!(&buf[frame.payload.clone()], b"hello");
        assert!(frame.starts_commit);
        assert_eq!(frame.len, buf.len());
        let buf = one(0, b"", false);
        let Parsed::Frame(frame) = parse(&buf, 0) else {
            panic!("an empty payload is a record");
        };
        assert!(!frame.starts_commit);
        assert!(frame.payload.is_empty());
    }

    #[test]
    fn zeros_are_empty_and_every_flipped_bit_is_bad() {
        assert_eq!(parse(&[0; 64], 0), Parsed::Empty);
        assert_eq!(parse(&[0; 8], 0), Parsed::Empty);
        let good = one(7, b"some payload", true);
        let payload_end = FRAME_HEADER + b"some payload".len();
        // Every bit of the header and payload is covered (the padding is not
        // read, so it is not checked).
        for bit in 0..payload_end * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(parse(&bad, 0), Parsed::Bad(_)),
                "bit {bit} flipped: {:?}",
                parse(&bad, 0)
            );
        }
    }

    #[test]
    fn a_huge_length_is_bad_without_allocating() {
        let mut buf = one(1, b"x", true);
        buf[0..4].copy_from_slice(&(0x7fff_fff0u32 | START_OF_COMMIT).to_le_bytes());
        assert_eq!(
            parse(&buf, 0),
            Parsed::Bad("record length runs past the end of the segment")
        );
    }

    #[test]
    fn find_after_jumps_over_the_records_it_finds() {
        // A payload that holds a whole frame must not be found as a record.
        let inner = one(9, b"inner", true);
        let mut buf = vec![0u8; 8];
        buf[0] = 0xff; // a damaged frame at 0
        buf.extend(one(1, &inner, true));
        buf.extend(one(2, b"b", false));
        buf.extend([0u8; 32]);
        let found = find_after(&buf, 0);
        let indexes: Vec<u64> = found.iter().map(|f| f.index).collect();
        assert_eq!(indexes, vec![1, 2]);
        assert_eq!(found[0].offset, 8);
    }
}
