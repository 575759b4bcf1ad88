//! One node's `Pipeline` call, shared by every request a client process sends to that node.
//!
//! A background task owns the call. It takes every request queued since it last looked,
//! sends them as one batch, and hands each tagged answer to the request that waits for it. So
//! with many requests in flight, a batch costs one gRPC message instead of one call per
//! request, and the node proposes the whole batch at once. With one request in flight it is
//! still one message each way.
//!
//! Failures say whether the request can have reached the node: `NotSent` (the call could not be
//! opened, so the request never left this process) or `Lost` (the call broke after the request
//! was sent: a write may have been applied).

use std::collections::HashMap;

use crate::security::Conn as Channel;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

use crate::proto;
use crate::proto::data_service_client::DataServiceClient;
use crate::transport::peer::{BATCH_BYTES_MAX, GRPC_MESSAGE_BYTES_MAX};
use crate::transport::split_by_encoded_len;

/// Requests sent in one batch at most.
const BATCH_REQUESTS_MAX: usize = 1024;

pub type Request = proto::tagged_request::Request;
pub type Reply = proto::tagged_reply::Reply;

/// Why a pipelined request got no answer.
#[derive(Debug)]
pub enum Failure {
    /// The call could not be opened: the request was never sent.
    NotSent(Status),
    /// The call broke after the request was sent.
    Lost(Status),
}

struct Call {
    request: Request,
    answer: oneshot::Sender<Result<Reply, Failure>>,
}

/// A handle to one node's pipeline; clones share it. The task ends when the last clone goes.
#[derive(Clone)]
pub struct Pipeline {
    calls: mpsc::UnboundedSender<Call>,
}

impl Pipeline {
    /// Starts the task for the node behind `channel`. The call is opened at the first request.
    pub fn start(channel: Channel) -> Pipeline {
        let (calls, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(channel, rx));
        Pipeline { calls }
    }

    /// Sends `request` and waits for its answer.
    pub async fn call(&self, request: Request) -> Result<Reply, Failure> {
        let (answer, rx) = oneshot::channel();
        let gone = || Status::unavailable("the client's connection task stopped");
        if self.calls.send(Call { request, answer }).is_err() {
            return Err(Failure::NotSent(gone()));
        }
        rx.await.unwrap_or_else(|_| Err(Failure::Lost(gone())))
    }
}

async fn run(channel: Channel, mut calls: mpsc::UnboundedReceiver<Call>) {
    let mut queued: Vec<Call> = Vec::new();
    loop {
        if queued.is_empty() {
            match calls.recv().await {
                Some(c) => queued.push(c),
                None => return,
            }
        }
        let mut client = DataServiceClient::new(channel.clone())
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
        let (batches, outgoing) = mpsc::unbounded_channel::<proto::RequestBatch>();
        // Nothing is sent before the node has accepted the call, so a failure here means that
        // none of the queued requests reached it.
        let mut replies = match client
            .pipeline(UnboundedReceiverStream::new(outgoing))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => {
                while let Ok(c) = calls.try_recv() {
                    queued.push(c);
                }
                for c in queued.drain(..) {
                    let _ = c.answer.send(Err(Failure::NotSent(status.clone())));
                }
                continue;
            }
        };
        let mut waiting: HashMap<u64, oneshot::Sender<Result<Reply, Failure>>> = HashMap::new();
        let mut next_tag = 0u64;
        let broken = loop {
            while queued.len() < BATCH_REQUESTS_MAX {
                match calls.try_recv() {
                    Ok(c) => queued.push(c),
                    Err(_) => break,
                }
            }
            if !queued.is_empty() {
                let requests: Vec<_> = queued
                    .drain(..)
                    .filter(|c| !c.answer.is_closed())
                    .map(|c| {
                        next_tag += 1;
                        waiting.insert(next_tag, c.answer);
                        proto::TaggedRequest {
                            tag: next_tag,
                            request: Some(c.request),
                        }
                    })
                    .collect();
                // Large values: several batches, each far below the gRPC message limit.
                let sent = split_by_encoded_len(requests, BATCH_BYTES_MAX)
                    .into_iter()
                    .all(|requests| batches.send(proto::RequestBatch { requests }).is_ok());
                if !sent {
                    break Status::unavailable("the connection to the node closed");
                }
            }
            tokio::select! {
                reply = replies.message() => match reply {
                    Ok(Some(batch)) => {
                        for r in batch.replies {
                            if let (Some(answer), Some(reply)) = (waiting.remove(&r.tag), r.reply) {
                                let _ = answer.send(Ok(reply));
                            }
                        }
                        // Requests whose callers gave up (deadline) are forgotten; the node
                        // answers every request eventually, so this only bounds the map.
                        if waiting.len() > 4 * BATCH_REQUESTS_MAX {
                            waiting.retain(|_, a| !a.is_closed());
                        }
                    }
                    Ok(None) => break Status::unavailable("the node ended the call"),
                    Err(status) => break status,
                },
                call = calls.recv() => match call {
                    Some(c) => queued.push(c),
                    None => return,
                },
            }
        };
        for (_, answer) in waiting.drain() {
            let _ = answer.send(Err(Failure::Lost(broken.clone())));
        }
    }
}
