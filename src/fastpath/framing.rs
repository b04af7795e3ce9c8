//! Where a chunked upstream body ends, found while its bytes pass through unchanged,
//! and (when asked) its data bytes without the framing: an HTTP/1.0 client gets those
//! close-delimited, and a GraphQL answer is judged on them. Pure, no I/O. Strict: hex sizes without sign or spaces before the extension, CRLF
//! only, a size of at most 15 hex digits; trailers are passed through.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the size digits (`digits` so far).
    Size {
        size: u64,
        digits: u8,
    },
    /// After `;`: a chunk extension, up to CR.
    Ext {
        size: u64,
    },
    /// CR of the size line seen; LF expected.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// Start of a trailer line (or the final CRLF).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    TrailerLf,
    /// CR of the final empty line seen.
    EndLf,
    Done,
}

#[derive(Debug)]
pub struct Chunked {
    state: State,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Feed {
    /// Every byte given belongs to the body; more is needed.
    More,
    /// The body ends after this many of the bytes given.
    Done(usize),
    Invalid,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked { state: State::Size { size: 0, digits: 0 } }
    }
}

impl Chunked {
    pub fn feed(&mut self, bytes: &[u8]) -> Feed {
        self.feed_into(bytes, None)
    }

    /// [`Chunked::feed`], also appending the chunks' data bytes to `data`.
    pub fn feed_into(&mut self, bytes: &[u8], mut data: Option<&mut Vec<u8>>) -> Feed {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                State::Size { size, digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < 15 => State::Size { size: size * 16 + u64::from(d), digits: digits + 1 },
                    Some(_) => return Feed::Invalid,
                    None if digits == 0 => return Feed::Invalid,
                    None if b == b';' => State::Ext { size },
                    None if b == b'\r' => State::SizeLf { size },
                    None => return Feed::Invalid,
                },
                State::Ext { size } => match b {
                    b'\r' => State::SizeLf { size },
                    b'\n' => return Feed::Invalid,
                    _ => State::Ext { size },
                },
                State::SizeLf { size } => match (b, size) {
                    (b'\n', 0) => State::TrailerStart,
                    (b'\n', n) => State::Data { left: n },
                    _ => return Feed::Invalid,
                },
                State::Data { left } => {
                    let take = (bytes.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    if let Some(d) = data.as_deref_mut() {
                        d.extend_from_slice(&bytes[i..i + take]);
                    }
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { State::DataCr } else { State::Data { left } };
                    continue;
                }
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size { size: 0, digits: 0 },
                State::DataCr | State::DataLf => return Feed::Invalid,
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    b'\n' => return Feed::Invalid,
                    _ => State::Trailer,
                },
                State::Trailer => match b {
                    b'\r' => State::TrailerLf,
                    b'\n' => return Feed::Invalid,
                    _ => State::Trailer,
                },
                State::TrailerLf if b == b'\n' => State::TrailerStart,
                State::EndLf if b == b'\n' => {
                    self.state = State::Done;
                    return Feed::Done(i + 1);
                }
                State::TrailerLf | State::EndLf => return Feed::Invalid,
                State::Done => return Feed::Done(i),
            };
            i += 1;
        }
        if self.state == State::Done {
            Feed::Done(0)
        } else {
            Feed::More
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(body: &[u8]) -> Feed {
        Chunked::default().feed(body)
    }

    #[test]
    fn the_end_is_found_whatever_the_split() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(whole(body), Feed::Done(end));
        for split in 0..body.len() {
            let mut c = Chunked::default();
            let (a, b) = body.split_at(split);
            match c.feed(a) {
                Feed::Done(n) => assert_eq!(n, end, "split {split}"),
                Feed::More => assert_eq!(c.feed(b), Feed::Done(end - split), "split {split}"),
                Feed::Invalid => panic!("split {split}"),
            }
        }
        assert_eq!(whole(b"0\r\n\r\n"), Feed::Done(5));
        assert_eq!(whole(b"A\r\n0123456789\r\n0\r\n"), Feed::More);
    }

    #[test]
    fn the_data_is_what_remains_without_the_framing_whatever_the_split() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..body.len() {
            let (mut c, mut data) = (Chunked::default(), Vec::new());
            let (a, b) = body.split_at(split);
            let mut end = c.feed_into(a, Some(&mut data));
            if end == Feed::More {
                end = c.feed_into(b, Some(&mut data));
            }
            assert!(matches!(end, Feed::Done(_)), "split {split}");
            assert_eq!(data, b"hello world", "split {split}");
        }
    }

    #[test]
    fn malformed_framing_is_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n",
            b" 5\r\nhello\r\n",
            b"5 \r\nhello\r\n",
            b"0\r\n\n",
            b"1000000000000000\r\n",
            b"\r\n",
        ] {
            assert_eq!(whole(bad), Feed::Invalid, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
