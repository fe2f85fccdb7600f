//! Reading a key range in pages at one revision, so that no answer nears gRPC's 4 MiB message
//! limit however many keys there are, with one page in memory at a time. The caller sends
//! each request (with its own timeout) and hands the answer back.

use std::future::Future;

use etcd_client::{GetOptions, GetResponse, KeyValue};

/// Keys per page: 100 keys of at most 32 KiB stay under 4 MiB.
pub const PAGE: i64 = 100;

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Where a paged read of one prefix stands.
#[derive(Clone, Debug)]
pub struct Pages {
    from: Option<Vec<u8>>,
    end: Vec<u8>,
    revision: i64,
}

impl Pages {
    pub fn new(prefix: &str) -> Pages {
        Pages {
            from: Some(prefix.as_bytes().to_vec()),
            end: prefix_end(prefix),
            revision: 0,
        }
    }

    /// The next page's key and options (at the first page's revision), or `None` when done.
    pub fn next_request(&self) -> Option<(Vec<u8>, GetOptions)> {
        let from = self.from.clone()?;
        let mut opts = GetOptions::new().with_range(self.end.clone()).with_limit(PAGE);
        if self.revision > 0 {
            opts = opts.with_revision(self.revision);
        }
        Some((from, opts))
    }

    /// Takes a page's answer into account: the next page starts after its last key.
    pub fn advance(&mut self, page: &GetResponse) {
        if self.revision == 0 {
            self.revision = page.header().map_or(0, |h| h.revision());
        }
        self.from = match page.kvs().last() {
            Some(last) if page.more() => {
                let mut next = last.key().to_vec();
                next.push(0);
                Some(next)
            }
            _ => None,
        };
    }

    /// The revision every page was read at (0 before the first answer).
    pub fn revision(&self) -> i64 {
        self.revision
    }
}

/// Reads every key under `prefix` in pages at one revision: `get` sends one page's request
/// (with the caller's own timeout and error type), `each` sees every key-value in order.
/// Returns the revision every page was read at, from which a watch continues.
///
/// # Errors
/// The first error `get` returns.
pub async fn read_pages<E, Fut>(
    prefix: &str,
    mut get: impl FnMut(Vec<u8>, GetOptions) -> Fut,
    mut each: impl FnMut(&KeyValue),
) -> Result<i64, E>
where
    Fut: Future<Output = Result<GetResponse, E>>,
{
    let mut pages = Pages::new(prefix);
    while let Some((key, opts)) = pages.next_request() {
        let page = get(key, opts).await?;
        page.kvs().iter().for_each(&mut each);
        pages.advance(&page);
    }
    Ok(pages.revision())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_the_next_key() {
        assert_eq!(prefix_end("/corral/a/"), b"/corral/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }
}
