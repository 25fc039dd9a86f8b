//! vidpipe's integration tests: one binary, real RabbitMQ (`AMQP_URL`, default the local
//! broker), real worker processes, real FFmpeg. Each test gets its own topology prefix
//! and storage root, so tests run in parallel and never see each other's queues.
//! Set `TEST_LOG=1` to see worker logs.

mod support;

mod broker_list;
mod broker_refusal;
mod cancel;
mod chaos;
mod cluster;
mod cmaf;
mod health;
mod hostile;
mod players;
mod priority;
mod producer;
mod registry;
mod runtime;
mod s3;
mod security;
mod segments;
mod settings;
mod thumbnailer;
mod tls;
mod transcoder;
mod watch;
mod workers;
