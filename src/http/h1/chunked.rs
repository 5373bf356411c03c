//! Where a chunked message body ends (RFC 9112 section 7.1), found without decoding it: the
//! fast path relays a node's chunked response byte for byte and only needs to know which
//! byte is the last one, so that the connection can carry the next response.
//!
//! [`ChunkedEnd`] is a state machine fed the body's bytes in whatever pieces they arrive;
//! it never buffers and never allocates. Malformed framing is an error: the relay then
//! closes both connections rather than guess where the next message starts.

/// A chunk-size line longer than this (hex digits plus extensions) is refused.
const MAX_LINE: u32 = 4096;
/// A trailer section larger than this is refused.
const MAX_TRAILERS: u32 = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size (at least one seen once `digits > 0`).
    Size,
    /// After the size: chunk extensions up to CR.
    Ext,
    /// CR of the size line seen; LF expected.
    SizeLf,
    /// Inside chunk data.
    Data,
    /// After chunk data: CR expected.
    DataCr,
    /// After chunk data's CR: LF expected.
    DataLf,
    /// After the last chunk's size line: start of a trailer line, or the final CRLF.
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    /// CR of a trailer line seen; LF expected.
    TrailerLf,
    /// CR of the final empty line seen; LF expected.
    EndLf,
    Done,
}

/// The framing went wrong; the message's end cannot be known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub struct ChunkedError(&'static str);

/// Tracks a chunked body's framing.
#[derive(Debug, Clone)]
pub struct ChunkedEnd {
    state: State,
    /// Bytes left in the current chunk (`Data`), or the size being read (`Size`).
    size: u64,
    digits: u32,
    /// Bytes of the current size line or of the trailer section so far.
    line: u32,
}

impl Default for ChunkedEnd {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedEnd {
    pub fn new() -> ChunkedEnd {
        ChunkedEnd {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
        }
    }

    /// Whether the whole body (last chunk and trailers) has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds the next bytes of the body. `Ok(Some(n))`: the body ends after `buf[..n]` (the
    /// rest belongs to whatever follows it); `Ok(None)`: all of `buf` is body and more is to
    /// come.
    pub fn feed(&mut self, buf: &[u8]) -> Result<Option<usize>, ChunkedError> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                State::Done => return Ok(Some(i)),
                State::Size => match hex(b) {
                    Some(d) => {
                        // Below 16^15 (the value, not the digits: leading zeros are allowed,
                        // and bounded by the line's length).
                        if self.size >= 1 << 56 {
                            return Err(ChunkedError("chunk size too large"));
                        }
                        self.size = self.size * 16 + u64::from(d);
                        self.digits += 1;
                        self.grow_line()?;
                    }
                    None if self.digits == 0 => return Err(ChunkedError("chunk size expected")),
                    None => match b {
                        b'\r' => self.state = State::SizeLf,
                        b';' | b' ' | b'\t' => {
                            self.state = State::Ext;
                            self.grow_line()?;
                        }
                        _ => return Err(ChunkedError("invalid byte in chunk size")),
                    },
                },
                State::Ext => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkedError("bare LF in chunk size line")),
                    b if is_ctl(b) => return Err(ChunkedError("control byte in chunk extension")),
                    _ => self.grow_line()?,
                },
                State::SizeLf => {
                    expect(b, b'\n', "CR without LF in chunk size line")?;
                    self.line = 0;
                    self.digits = 0;
                    if self.size == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        self.state = State::Data;
                    }
                }
                State::Data => {
                    let take =
                        (buf.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    expect(b, b'\r', "chunk data longer than its size")?;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    expect(b, b'\n', "CR without LF after chunk data")?;
                    self.state = State::Size;
                }
                State::TrailerStart => match b {
                    b'\r' => self.state = State::EndLf,
                    b'\n' => return Err(ChunkedError("bare LF in trailers")),
                    b if is_ctl(b) => return Err(ChunkedError("control byte in trailers")),
                    _ => {
                        self.grow_trailers()?;
                        self.state = State::Trailer;
                    }
                },
                State::Trailer => match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\n' => return Err(ChunkedError("bare LF in trailers")),
                    b if is_ctl(b) => return Err(ChunkedError("control byte in trailers")),
                    _ => self.grow_trailers()?,
                },
                State::TrailerLf => {
                    expect(b, b'\n', "CR without LF in trailers")?;
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    expect(b, b'\n', "CR without LF at the end of the body")?;
                    self.state = State::Done;
                    return Ok(Some(i + 1));
                }
            }
            i += 1;
        }
        Ok((self.state == State::Done).then_some(buf.len()))
    }

    fn grow_line(&mut self) -> Result<(), ChunkedError> {
        self.line += 1;
        if self.line > MAX_LINE {
            return Err(ChunkedError("chunk size line too long"));
        }
        Ok(())
    }

    fn grow_trailers(&mut self) -> Result<(), ChunkedError> {
        self.line += 1;
        if self.line > MAX_TRAILERS {
            return Err(ChunkedError("trailers too large"));
        }
        Ok(())
    }
}

/// `b` must be `want` (a CR or LF the framing requires), else `why`.
fn expect(b: u8, want: u8, why: &'static str) -> Result<(), ChunkedError> {
    if b == want {
        Ok(())
    } else {
        Err(ChunkedError(why))
    }
}

/// A control byte no chunk extension or trailer field line may carry (RFC 9110 section
/// 5.5; RFC 9112 section 7.1.1: extensions are tokens and quoted strings): every CTL but
/// HTAB, which is whitespace there. A client's parser may end the line, or the message, at
/// one where this relay did not, so the relay closes both connections instead (CR and LF
/// are the framing's own and are checked where they belong).
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t' && b != b'\r' && b != b'\n') || b == 0x7f
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` split at `at`; the body's end as `feed` reports it, counted from the
    /// start of `body`.
    fn end_split(body: &[u8], at: usize) -> Result<Option<usize>, ChunkedError> {
        let mut c = ChunkedEnd::new();
        if let Some(n) = c.feed(&body[..at])? {
            return Ok(Some(n));
        }
        Ok(c.feed(&body[at..])?.map(|n| at + n))
    }

    #[test]
    fn the_end_is_found_however_the_bytes_are_split() {
        let body = b"5;ext=1;q=\"a\tb\xff\"\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 9\r\n\r\n";
        for at in 0..=body.len() {
            assert_eq!(end_split(body, at), Ok(Some(body.len())), "split at {at}");
        }
    }

    #[test]
    fn bytes_after_the_body_are_not_part_of_it() {
        let mut wire = b"3\r\nabc\r\n0\r\n\r\n".to_vec();
        let end = wire.len();
        wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for at in 0..=wire.len() {
            assert_eq!(end_split(&wire, at), Ok(Some(end)), "split at {at}");
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let body = b"2\r\nhi\r\n0\r\n\r\n";
        let mut c = ChunkedEnd::new();
        for (i, b) in body.iter().enumerate() {
            let r = c.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!(r.is_some(), i == body.len() - 1, "byte {i}");
        }
        assert!(c.is_done());
    }

    #[test]
    fn an_unfinished_body_waits_for_more() {
        let mut c = ChunkedEnd::new();
        assert_eq!(c.feed(b"10\r\n0123456789"), Ok(None));
        assert_eq!(c.feed(b"abcdef\r\n0\r\n"), Ok(None));
        assert!(!c.is_done());
        assert_eq!(c.feed(b"\r\n"), Ok(Some(2)));
    }

    #[test]
    fn a_size_with_leading_zeros_is_its_value() {
        // RFC 9112 section 7.1: chunk-size = 1*HEXDIG; sixteen digits, fifteen of them zeros.
        let mut c = ChunkedEnd::new();
        assert_eq!(c.feed(b"0000000000000001\r\na\r\n0\r\n\r\n"), Ok(Some(26)));
        // The largest size taken has fifteen significant digits.
        let mut c = ChunkedEnd::new();
        assert_eq!(c.feed(b"00fffffffffffffff\r\n"), Ok(None));
        let mut c = ChunkedEnd::new();
        assert!(c.feed(b"1000000000000000\r\n").is_err());
    }

    #[test]
    fn malformed_framing_is_an_error() {
        for bad in [
            &b"x\r\n"[..],
            b"3\r\nabcd\r\n",
            b"3\nabc",
            b"3\r\nabc\r\n0\r\nTrailer: x\n",
            b"3\rabc",
            b"ffffffffffffffff1\r\n",
            b"\r\n",
            // Control bytes where a client's parser could take the line to end elsewhere.
            b"3;ext=\0\r\nabc\r\n",
            b"3;a\x0bb\r\nabc\r\n",
            b"3;a\x7f\r\nabc\r\n",
            b"0\r\nX-T: a\x00b\r\n\r\n",
            b"0\r\n\x01X-T: a\r\n\r\n",
        ] {
            let mut c = ChunkedEnd::new();
            assert!(c.feed(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// A chunked encoding of `chunks` (sizes in hex with optional extensions), then trailers.
    fn encode(chunks: &[Vec<u8>], ext: bool, trailers: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend_from_slice(format!("{:X}", c.len()).as_bytes());
            if ext {
                out.extend_from_slice(b";name=v");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for t in trailers {
            out.extend_from_slice(format!("X-{t}: v\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest::proptest! {
        #[test]
        fn any_valid_body_ends_exactly_where_it_ends_however_it_is_cut(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..6),
            ext in proptest::bool::ANY,
            trailers in proptest::collection::vec("[a-z]{1,8}", 0..3),
            cuts in proptest::collection::vec(0usize..2000, 0..6),
        ) {
            let mut wire = encode(&chunks, ext, &trailers);
            let end = wire.len();
            wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut c = ChunkedEnd::new();
            let mut at = 0;
            let mut found = None;
            for cut in cuts {
                if let Some(n) = c.feed(&wire[at..cut]).unwrap() {
                    found = Some(at + n);
                    break;
                }
                at = cut;
            }
            proptest::prop_assert_eq!(found, Some(end));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut c = ChunkedEnd::new();
            if let Ok(Some(n)) = c.feed(&bytes) {
                proptest::prop_assert!(n <= bytes.len());
            }
        }
    }

    #[test]
    fn endless_size_lines_and_trailers_are_refused() {
        let mut c = ChunkedEnd::new();
        let mut line = b"1;".to_vec();
        line.resize(5000, b'a');
        assert!(c.feed(&line).is_err());
        let mut c = ChunkedEnd::new();
        let mut t = b"0\r\nX-T: ".to_vec();
        t.resize(20_000, b'a');
        assert!(c.feed(&t).is_err());
    }
}
