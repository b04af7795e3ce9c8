//! Responses tollgate writes itself (no route, no token, upstream failure): always JSON,
//! with a content length, never cached, so a client gets a reason instead of a hang or
//! an empty 502.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use serde_json::Value;

pub async fn json(session: &mut Session, status: u16, body: &Value, retry_after: Option<u64>) -> Result<()> {
    let body = Bytes::from(body.to_string());
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    if let Some(secs) = retry_after {
        resp.insert_header(http::header::RETRY_AFTER, secs.max(1).to_string())?;
    }
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}
