//! Reading request bodies within a memory budget shared by all requests.
//!
//! A body is buffered whole before its image is decoded, and a client decides how many
//! connections it opens and how slowly it sends: without a bound, many large uploads
//! at once would take memory without limit (the queue bounds requests only once their
//! image is decoded). Every body reserves memory from the budget
//! (`--body-memory-mib`) ahead of its bytes as they arrive (doubling, up to the
//! declared `Content-Length`), times the copies its media type makes while it is
//! parsed ([`BodyKind::copies`]). A body with a declared length is read into one
//! buffer of that length, whose pages take memory only as the bytes arrive (an
//! allocation the system refuses is a 429 too, not an abort). The reservation lasts
//! until the image bytes taken from it are dropped, after the decode. A body that does
//! not fit is refused with 429 `overloaded` and `Retry-After`, so the client can retry
//! later or elsewhere; nothing waits for room. A connection that has sent headers but
//! no body holds nothing.
//!
//! A body refused before its end (that 429, a 413, or any answer given before the body
//! was read: a full queue, a wrong key or media type) is read on after the answer and
//! thrown away as it comes ([`discard_unread`]), for a while: a client that writes its
//! whole body before it reads gets the answer rather than a reset connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderMap, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

const KIB: usize = 1024;

/// How a body is parsed, which decides how many copies of it exist at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// The body is the image.
    Raw,
    /// multipart/form-data: the parser buffers the body again.
    Multipart,
    /// JSON with base64 images: the parsed strings, then the decoded images (3/4).
    Json,
}

impl BodyKind {
    /// Bytes held at once per byte of body, at most.
    pub fn copies(self) -> usize {
        match self {
            BodyKind::Raw => 1,
            BodyKind::Multipart => 2,
            BodyKind::Json => 3,
        }
    }
}

/// The memory all request bodies being read or held may take together.
#[derive(Debug)]
pub struct BodyBudget {
    /// One permit per KiB.
    permits: Arc<Semaphore>,
}

impl BodyBudget {
    pub fn new(mib: u32) -> BodyBudget {
        BodyBudget {
            permits: Arc::new(Semaphore::new(mib.max(1) as usize * KIB)),
        }
    }

    /// KiB free now (tests, metrics).
    pub fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }

    /// An empty reservation, to grow as the body arrives.
    fn reservation(&self) -> Reservation {
        Reservation {
            permits: self.permits.clone(),
            held: None,
            bytes: 0,
        }
    }
}

/// Memory reserved from a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    permits: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    /// Bytes covered (a whole number of KiB).
    bytes: usize,
}

impl Reservation {
    /// Grows the reservation to cover at least `bytes`, if the budget has room now.
    fn grow_to(&mut self, bytes: usize) -> Result<(), ApiError> {
        if bytes <= self.bytes {
            return Ok(());
        }
        let more = (bytes - self.bytes).div_ceil(KIB);
        let permit = u32::try_from(more)
            .ok()
            .and_then(|n| self.permits.clone().try_acquire_many_owned(n).ok())
            .ok_or(ApiError::UploadsBusy)?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        self.bytes += more * KIB;
        Ok(())
    }
}

/// Bytes that keep a [`Reservation`] until the last clone of them is dropped.
pub fn hold(data: impl AsRef<[u8]> + Send + 'static, reservation: Arc<Reservation>) -> Bytes {
    struct Held<T> {
        data: T,
        _reservation: Arc<Reservation>,
    }
    impl<T: AsRef<[u8]>> AsRef<[u8]> for Held<T> {
        fn as_ref(&self) -> &[u8] {
            self.data.as_ref()
        }
    }
    Bytes::from_owner(Held {
        data,
        _reservation: reservation,
    })
}

/// The first reservation of a body, and the least it grows by.
const FIRST_RESERVATION: usize = 64 * KIB;

/// Reads the whole body within `budget`: 413 above `limit` bytes, 408 if it has not
/// arrived in full by `deadline` (a slow or stalled upload), 429 if the budget has no
/// room for it (times `kind`'s copies). The reservation grows with the bytes received
/// (doubling, up to the declared length), so a client holds only what it has sent.
/// The reservation comes back with the bytes: hold it (see [`hold`]) until the image
/// taken from them is decoded.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    deadline: Instant,
    budget: &BodyBudget,
    kind: BodyKind,
) -> Result<(Bytes, Reservation), ApiError> {
    let declared = declared_length(headers);
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    // Hyper refuses a body longer than it declared.
    let most = declared.map_or(limit, |n| n as usize);
    let copies = kind.copies();
    let mut reservation = budget.reservation();
    let deadline = tokio::time::Instant::from_std(deadline);
    let mut body = body;
    let mut buffer: Vec<u8> = Vec::new();
    let mut received = 0usize;
    while let Some(data) = next_data(&mut body, deadline).await? {
        received += data.len();
        if received > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        if received.saturating_mul(copies) > reservation.bytes || received > buffer.capacity() {
            // The reservation stays ahead of the bytes received, doubling (at least
            // 64 KiB, at most the declared length).
            let ahead = received
                .max(reservation.bytes / copies * 2)
                .max(FIRST_RESERVATION)
                .min(most.max(received));
            // A declared body gets one buffer of its length (its pages take memory as
            // the bytes arrive; no regrowth copies it); a chunked one grows with its
            // reservation.
            let capacity = if declared.is_some() { most } else { ahead };
            let room = reservation.grow_to(ahead * copies).is_ok()
                && (capacity <= buffer.capacity()
                    || buffer.try_reserve_exact(capacity - buffer.len()).is_ok());
            if !room {
                return Err(ApiError::UploadsBusy);
            }
        }
        buffer.extend_from_slice(&data);
    }
    Ok((Bytes::from(buffer), reservation))
}

/// The body's length as its `Content-Length` declares it, if it does.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// How long the rest of a body left unread by its answer is read and thrown away, at
/// most.
pub const LINGER_TIME: Duration = Duration::from_secs(30);

/// How long that reading waits for the next bytes: a client that has stopped sending
/// (a stalled upload that got its 408) is not waited for long.
pub const LINGER_IDLE: Duration = Duration::from_secs(5);

/// Reads the rest of a body that its answer left unread, and throws it away as it comes,
/// for at most [`LINGER_TIME`] and `max_bytes`, and no longer than [`LINGER_IDLE`]
/// between pieces; then drops it, which closes the connection. Hyper writes the answer
/// meanwhile: a client that writes its whole body before it reads (most do) then finds
/// the answer, where closing at once with its bytes unread would reset the connection
/// and lose the answer. Nothing is kept, so this costs bandwidth and a connection for a
/// while, not memory.
pub async fn discard_unread(mut body: Body, max_bytes: usize) {
    let end = tokio::time::Instant::now() + LINGER_TIME;
    let mut left = max_bytes;
    loop {
        let deadline = end.min(tokio::time::Instant::now() + LINGER_IDLE);
        let Ok(Some(data)) = next_data(&mut body, deadline).await else {
            return;
        };
        match left.checked_sub(data.len()) {
            Some(rest) => left = rest,
            None => return,
        }
    }
}

/// The body's next piece of data: `None` at its end; 408 once `deadline` passes.
async fn next_data(
    body: &mut Body,
    deadline: tokio::time::Instant,
) -> Result<Option<Bytes>, ApiError> {
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut *body).poll_frame(cx));
        match tokio::time::timeout_at(deadline, frame).await {
            Err(_) => return Err(ApiError::BodyTimeout),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) if client_left(&e) => return Err(ApiError::ClientClosed),
            Ok(Some(Err(e))) => {
                return Err(ApiError::MalformedRequest(format!(
                    "cannot read the request body: {e}"
                )));
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                } // else trailers: read on
            }
        }
    }
}

/// Whether a body broke off because its client closed the connection (or reset it),
/// rather than because it was malformed.
fn client_left(e: &axum::Error) -> bool {
    use std::io::ErrorKind;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cause {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && h.is_incomplete_message()
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        cause = err.source();
    }
    false
}

/// Media types whose body is the image itself.
pub fn is_raw_image_type(media: &str) -> bool {
    media.starts_with("image/") || media == "application/octet-stream"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of `len` zeros with its Content-Length, read within 10 s.
    async fn declared(
        len: usize,
        limit: usize,
        budget: &BodyBudget,
        kind: BodyKind,
    ) -> Result<(Bytes, Reservation), ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, len.into());
        let deadline = Instant::now() + Duration::from_secs(10);
        read_body(
            &headers,
            Body::from(vec![0u8; len]),
            limit,
            deadline,
            budget,
            kind,
        )
        .await
    }

    /// A chunked body (no Content-Length) of `chunks` chunks of `size` bytes.
    async fn chunked(
        chunks: usize,
        size: usize,
        limit: usize,
        budget: &BodyBudget,
    ) -> Result<(Bytes, Reservation), ApiError> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..chunks)
            .map(|_| Ok(Bytes::from(vec![1u8; size])))
            .collect();
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let deadline = Instant::now() + Duration::from_secs(10);
        read_body(
            &HeaderMap::new(),
            body,
            limit,
            deadline,
            budget,
            BodyKind::Raw,
        )
        .await
    }

    #[tokio::test]
    async fn a_declared_body_reserves_its_copies_until_its_bytes_are_dropped() {
        let budget = BodyBudget::new(1);
        let (bytes, reservation) = declared(100 * KIB, 1 << 20, &budget, BodyKind::Json)
            .await
            .unwrap();
        assert_eq!(bytes.len(), 100 * KIB);
        assert_eq!(budget.available_kib(), 1024 - 300);
        let image = hold(bytes.slice(..10), Arc::new(reservation));
        drop(bytes);
        assert_eq!(budget.available_kib(), 1024 - 300);
        let clone = image.clone();
        drop(image);
        assert_eq!(budget.available_kib(), 1024 - 300);
        drop(clone);
        assert_eq!(budget.available_kib(), 1024);
    }

    #[tokio::test]
    async fn a_body_the_budget_has_no_room_for_is_refused_and_takes_nothing() {
        let budget = BodyBudget::new(1);
        let _held = declared(700 * KIB, 1 << 20, &budget, BodyKind::Raw)
            .await
            .unwrap();
        let e = declared(400 * KIB, 1 << 20, &budget, BodyKind::Raw)
            .await
            .unwrap_err();
        assert_eq!(e, ApiError::UploadsBusy);
        assert_eq!(e.status(), 429);
        // A failed reservation takes nothing.
        assert_eq!(budget.available_kib(), 1024 - 700);
    }

    #[tokio::test]
    async fn a_chunked_body_reserves_as_it_arrives_and_gives_back_on_failure() {
        let budget = BodyBudget::new(1);
        let (bytes, reservation) = chunked(8, 64 * KIB, 1 << 20, &budget).await.unwrap();
        assert_eq!(bytes.len(), 512 * KIB);
        assert!(reservation.bytes >= 512 * KIB && reservation.bytes <= 1024 * KIB);
        drop(reservation);
        // Too large for the budget as a whole, though under the body limit: 429 partway.
        let e = chunked(40, 64 * KIB, 4 << 20, &budget).await.unwrap_err();
        assert_eq!(e, ApiError::UploadsBusy);
        assert_eq!(budget.available_kib(), 1024);
    }

    #[tokio::test]
    async fn a_connection_that_sends_no_body_holds_nothing() {
        let budget = BodyBudget::new(1);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, (900 * KIB).into());
        let stalled = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
        let deadline = Instant::now() + Duration::from_millis(300);
        let read = read_body(
            &headers,
            Body::from_stream(stalled),
            1 << 20,
            deadline,
            &budget,
            BodyKind::Json,
        );
        let look = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            budget.available_kib()
        };
        let (read, available) = tokio::join!(read, look);
        assert_eq!(available, 1024);
        assert_eq!(read.unwrap_err().status(), 408);
    }

    #[tokio::test]
    async fn limits_and_deadlines_still_apply() {
        let budget = BodyBudget::new(64);
        let e = declared(2000, 1000, &budget, BodyKind::Raw)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 413);
        let e = chunked(3, 600, 1000, &budget).await.unwrap_err();
        assert_eq!(e.status(), 413);
        let stalled = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, 10.into());
        let deadline = Instant::now() + Duration::from_millis(50);
        let body = Body::from_stream(stalled);
        let e = read_body(&headers, body, 1000, deadline, &budget, BodyKind::Raw)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 408);
        assert_eq!(budget.available_kib(), 64 * 1024);
    }

    /// A body of 1 KiB pieces that counts the pieces taken: `pieces` of them, then its
    /// end or, if `stall`, nothing more for ever.
    fn counted_body(pieces: usize, stall: bool) -> (Body, Arc<std::sync::atomic::AtomicUsize>) {
        use futures_util::StreamExt;
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = taken.clone();
        let data = futures_util::stream::repeat_with(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![0u8; KIB]))
        })
        .take(pieces);
        let body = if stall {
            Body::from_stream(data.chain(futures_util::stream::pending()))
        } else {
            Body::from_stream(data)
        };
        (body, taken)
    }

    #[tokio::test]
    async fn an_unread_rest_is_discarded_within_its_bounds() {
        use std::sync::atomic::Ordering::SeqCst;
        // To its end, at once.
        let (body, taken) = counted_body(100, false);
        let start = Instant::now();
        discard_unread(body, 1 << 20).await;
        assert_eq!(taken.load(SeqCst), 100);
        assert!(start.elapsed() < LINGER_IDLE, "{:?}", start.elapsed());
        // Up to its byte limit only.
        let (body, taken) = counted_body(usize::MAX, false);
        discard_unread(body, 10 * KIB).await;
        assert_eq!(taken.load(SeqCst), 11);
        // A client that stops sending is waited for no longer than the idle limit.
        let (body, taken) = counted_body(3, true);
        let start = Instant::now();
        discard_unread(body, 1 << 20).await;
        assert_eq!(taken.load(SeqCst), 3);
        let waited = start.elapsed();
        assert!(waited >= LINGER_IDLE && waited < LINGER_TIME, "{waited:?}");
    }
}
