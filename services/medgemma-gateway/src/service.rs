//! `medgemma.gateway.v1.ClinicalTasks`: the proto edge. Requests are validated into task types,
//! run by [`Tasks`], and answered whole or as a stream of text deltas ending with the typed
//! response.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use medgemma_proto::gateway::v1 as pb;
use pb::clinical_tasks_server::ClinicalTasks;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::audit::{AuditNote, HasUsage};
use crate::deadline::Deadline;
use crate::error::GatewayError;
use crate::tasks::{CallCtx, Deltas, Tasks};
use crate::validate::{self, Limits};

/// How many stream messages may wait for a slow caller.
const STREAM_BUFFER: usize = 32;

/// The `ClinicalTasks` service.
#[derive(Debug, Clone)]
pub struct ClinicalTasksService {
    tasks: Arc<Tasks>,
    limits: Arc<Limits>,
    /// Deadline of a call that brings none.
    default_timeout: Option<Duration>,
}

impl ClinicalTasksService {
    /// The service over `tasks`.
    pub fn new(tasks: Arc<Tasks>, limits: Limits, default_timeout: Option<Duration>) -> Self {
        Self {
            tasks,
            limits: Arc::new(limits),
            default_timeout,
        }
    }

    fn ctx<T>(&self, req: &Request<T>) -> CallCtx {
        CallCtx {
            deadline: Deadline::of(req, self.default_timeout),
            trace: medgemma_rpc::trace::current(req),
        }
    }
}

/// Runs a task on its own task, sending its text deltas and then its final response (or its
/// error) to the caller. When the caller goes away, the task is dropped at once (which drops
/// the generator stream, which cancels the sequence).
fn stream_task<M, R, F, Fut>(
    note: AuditNote,
    task: F,
    delta: fn(String) -> M,
    last: fn(R) -> M,
) -> ReceiverStream<Result<M, Status>>
where
    M: Send + 'static,
    R: HasUsage + Send + 'static,
    F: FnOnce(Deltas) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, GatewayError>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<M, Status>>(STREAM_BUFFER);
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            let (dtx, mut drx) = mpsc::channel::<String>(STREAM_BUFFER);
            let fut = task(dtx);
            tokio::pin!(fut);
            let result = loop {
                tokio::select! {
                    biased;
                    () = tx.closed() => {
                        tracing::debug!("caller went away; cancelling");
                        return;
                    }
                    Some(d) = drx.recv() => {
                        if tx.send(Ok(delta(d))).await.is_err() {
                            return;
                        }
                    }
                    r = &mut fut => break r,
                }
            };
            while let Ok(d) = drx.try_recv() {
                if tx.send(Ok(delta(d))).await.is_err() {
                    return;
                }
            }
            let msg = match result {
                Ok(r) => {
                    note.usage(r.usage());
                    Ok(last(r))
                }
                Err(e) => {
                    tracing::info!(error = %e, "task failed");
                    Err(Status::from(e))
                }
            };
            let _ = tx.send(msg).await;
        }
        .instrument(span),
    );
    ReceiverStream::new(rx)
}

fn fail(e: GatewayError) -> Status {
    tracing::info!(error = %e, "task failed");
    e.into()
}

#[tonic::async_trait]
impl ClinicalTasks for ClinicalTasksService {
    async fn ask(
        &self,
        request: Request<pb::AskRequest>,
    ) -> Result<Response<pb::AskResponse>, Status> {
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::ask(request.into_inner(), &self.limits).map_err(fail)?;
        let r = self.tasks.ask(&ctx, task, None).await.map_err(fail)?;
        note.usage(r.usage.as_ref());
        Ok(Response::new(r))
    }

    type AskStreamStream = ReceiverStream<Result<pb::AskStreamResponse, Status>>;

    async fn ask_stream(
        &self,
        request: Request<pb::AskRequest>,
    ) -> Result<Response<Self::AskStreamStream>, Status> {
        use pb::ask_stream_response::Event;
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::ask(request.into_inner(), &self.limits).map_err(fail)?;
        let tasks = self.tasks.clone();
        Ok(Response::new(stream_task(
            note,
            move |d| async move { tasks.ask(&ctx, task, Some(&d)).await },
            |t| pb::AskStreamResponse {
                event: Some(Event::TextDelta(t)),
            },
            |r| pb::AskStreamResponse {
                event: Some(Event::Response(r)),
            },
        )))
    }

    async fn summarize_clinical_note(
        &self,
        request: Request<pb::SummarizeClinicalNoteRequest>,
    ) -> Result<Response<pb::SummarizeClinicalNoteResponse>, Status> {
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::summarize(request.into_inner(), &self.limits).map_err(fail)?;
        let r = self.tasks.summarize(&ctx, task, None).await.map_err(fail)?;
        note.usage(r.usage.as_ref());
        Ok(Response::new(r))
    }

    type SummarizeClinicalNoteStreamStream =
        ReceiverStream<Result<pb::SummarizeClinicalNoteStreamResponse, Status>>;

    async fn summarize_clinical_note_stream(
        &self,
        request: Request<pb::SummarizeClinicalNoteRequest>,
    ) -> Result<Response<Self::SummarizeClinicalNoteStreamStream>, Status> {
        use pb::summarize_clinical_note_stream_response::Event;
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::summarize(request.into_inner(), &self.limits).map_err(fail)?;
        let tasks = self.tasks.clone();
        Ok(Response::new(stream_task(
            note,
            move |d| async move { tasks.summarize(&ctx, task, Some(&d)).await },
            |t| pb::SummarizeClinicalNoteStreamResponse {
                event: Some(Event::TextDelta(t)),
            },
            |r| pb::SummarizeClinicalNoteStreamResponse {
                event: Some(Event::Response(r)),
            },
        )))
    }

    async fn answer_multiple_choice(
        &self,
        request: Request<pb::AnswerMultipleChoiceRequest>,
    ) -> Result<Response<pb::AnswerMultipleChoiceResponse>, Status> {
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::multiple_choice(request.into_inner(), &self.limits).map_err(fail)?;
        let r = self
            .tasks
            .multiple_choice(&ctx, task, None)
            .await
            .map_err(fail)?;
        note.usage(r.usage.as_ref());
        Ok(Response::new(r))
    }

    type AnswerMultipleChoiceStreamStream =
        ReceiverStream<Result<pb::AnswerMultipleChoiceStreamResponse, Status>>;

    async fn answer_multiple_choice_stream(
        &self,
        request: Request<pb::AnswerMultipleChoiceRequest>,
    ) -> Result<Response<Self::AnswerMultipleChoiceStreamStream>, Status> {
        use pb::answer_multiple_choice_stream_response::Event;
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::multiple_choice(request.into_inner(), &self.limits).map_err(fail)?;
        let tasks = self.tasks.clone();
        Ok(Response::new(stream_task(
            note,
            move |d| async move { tasks.multiple_choice(&ctx, task, Some(&d)).await },
            |t| pb::AnswerMultipleChoiceStreamResponse {
                event: Some(Event::TextDelta(t)),
            },
            |r| pb::AnswerMultipleChoiceStreamResponse {
                event: Some(Event::Response(r)),
            },
        )))
    }

    async fn deidentify(
        &self,
        request: Request<pb::DeidentifyRequest>,
    ) -> Result<Response<pb::DeidentifyResponse>, Status> {
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::deidentify(request.into_inner(), &self.limits).map_err(fail)?;
        let r = self.tasks.deidentify(&ctx, task).await.map_err(fail)?;
        note.usage(r.usage.as_ref());
        Ok(Response::new(r))
    }

    async fn draft_radiology_report(
        &self,
        request: Request<pb::DraftRadiologyReportRequest>,
    ) -> Result<Response<pb::DraftRadiologyReportResponse>, Status> {
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        if let Some(image) = &request.get_ref().image {
            note.image(&image.data);
        }
        let task = validate::report(request.into_inner(), &self.limits).map_err(fail)?;
        let r = self.tasks.report(&ctx, task, None).await.map_err(fail)?;
        note.usage(r.usage.as_ref());
        Ok(Response::new(r))
    }

    type DraftRadiologyReportStreamStream =
        ReceiverStream<Result<pb::DraftRadiologyReportStreamResponse, Status>>;

    async fn draft_radiology_report_stream(
        &self,
        request: Request<pb::DraftRadiologyReportRequest>,
    ) -> Result<Response<Self::DraftRadiologyReportStreamStream>, Status> {
        use pb::draft_radiology_report_stream_response::Event;
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        if let Some(image) = &request.get_ref().image {
            note.image(&image.data);
        }
        let task = validate::report(request.into_inner(), &self.limits).map_err(fail)?;
        let tasks = self.tasks.clone();
        Ok(Response::new(stream_task(
            note,
            move |d| async move { tasks.report(&ctx, task, Some(&d)).await },
            |t| pb::DraftRadiologyReportStreamResponse {
                event: Some(Event::TextDelta(t)),
            },
            |r| pb::DraftRadiologyReportStreamResponse {
                event: Some(Event::Response(r)),
            },
        )))
    }
}
