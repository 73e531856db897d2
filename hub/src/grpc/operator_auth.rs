//! The Operator API's door: checks `authorization: Bearer <token>` against
//! the core's policy (`auth::AuthPolicy::operator`) for the method being
//! called, before any handler runs. The operator's name travels on to the
//! handlers (for the log of admin actions) in the request's extensions.

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use crate::auth::{AuthError, AuthPolicy};

#[derive(Clone)]
pub struct OperatorAuth<S> {
    inner: S,
    policy: Arc<AuthPolicy>,
}

impl<S> OperatorAuth<S> {
    pub fn new(inner: S, policy: Arc<AuthPolicy>) -> Self {
        Self { inner, policy }
    }
}

impl<S: NamedService> NamedService for OperatorAuth<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<Request<B>> for OperatorAuth<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let bearer = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match self.policy.operator(bearer, method) {
            Ok(operator) => {
                if let Some(operator) = operator {
                    request.extensions_mut().insert(operator);
                }
                // The clone that was polled ready serves this call.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(ready.call(request))
            }
            Err(e) => {
                let status = match e {
                    AuthError::Unauthenticated => Status::unauthenticated(
                        "a valid operator token is required (authorization: Bearer ...)",
                    ),
                    AuthError::Forbidden { .. } => Status::permission_denied(e.to_string()),
                };
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
