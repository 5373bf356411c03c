//! Reading an HTTP answer as a client, bounded in size: what the load harness and the demo
//! nodes read from a router (answers to joins, node listings, heartbeat replies). Every such
//! read also has a time limit, the reqwest client's `timeout`; this adds the size limit, so
//! a misbehaving or hostile server cannot make a client buffer without end.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;

/// Why a capped read failed.
#[derive(Debug, thiserror::Error)]
pub enum CappedError {
    /// The body failed, or was longer than the limit.
    #[error("reading the answer: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The body is not the JSON expected.
    #[error("decoding the answer: {0}")]
    Json(#[from] serde_json::Error),
}

/// The whole body of `resp`, if it is at most `max` bytes.
pub async fn bytes(resp: reqwest::Response, max: usize) -> Result<Bytes, CappedError> {
    let body = http::Response::from(resp).into_body();
    Limited::new(body, max)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(CappedError::Body)
}

/// The body of `resp` as JSON, if it is at most `max` bytes.
pub async fn json<T: DeserializeOwned>(
    resp: reqwest::Response,
    max: usize,
) -> Result<T, CappedError> {
    Ok(serde_json::from_slice(&bytes(resp, max).await?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    /// A server that answers every request with `n` bytes of JSON string.
    async fn serve(n: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Bounded: two connections at most per test.
            for _ in 0..2 {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let svc = service_fn(move |_| async move {
                    let body = format!("\"{}\"", "x".repeat(n - 2));
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc),
                );
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn an_answer_within_the_limit_is_read_and_a_longer_one_refused() {
        let url = serve(1000).await;
        let client = reqwest::Client::new();
        let ok: String = json(client.get(&url).send().await.unwrap(), 1000)
            .await
            .unwrap();
        assert_eq!(ok.len(), 998);
        let too_long = bytes(client.get(&url).send().await.unwrap(), 999).await;
        assert!(
            matches!(too_long, Err(CappedError::Body(_))),
            "{too_long:?}"
        );
    }
}
