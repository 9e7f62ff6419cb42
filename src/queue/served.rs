//! The queues one process serves (`--queue`, repeatable): the first is the default. Only
//! they are enqueued to, scaled, dispatched and labelled in metrics, so a caller cannot make
//! a queue that nobody serves (its tickets would wait for ever) or a metric series per
//! made-up name.

use std::fmt;

use super::{InvalidQueueName, QueueName};

/// The most queues one process serves: each has its own dispatcher and metric series.
pub const MAX_SERVED_QUEUES: usize = 32;

/// The served queues: at least one, no repeats, the default first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedQueues(Vec<QueueName>);

/// The list of served queues cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidServedQueues {
    /// No queue at all.
    #[error("at least one queue must be served")]
    Empty,
    /// A name given twice.
    #[error("queue {0:?} is named twice")]
    Repeated(String),
    /// More than [`MAX_SERVED_QUEUES`].
    #[error("{0} queues named; at most {MAX_SERVED_QUEUES} can be served")]
    TooMany(usize),
}

/// A request named a queue this process does not serve, or no valid queue name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnservedQueue {
    /// Not a queue name at all.
    #[error(transparent)]
    Invalid(#[from] InvalidQueueName),
    /// A valid name that is not served.
    #[error("queue {queue:?} is not served here; the served queues are {served}")]
    NotServed {
        /// The name asked for.
        queue: String,
        /// The served names, comma separated.
        served: String,
    },
}

impl ServedQueues {
    /// The queues in order, the first being the default.
    pub fn new(queues: Vec<QueueName>) -> Result<Self, InvalidServedQueues> {
        if queues.is_empty() {
            return Err(InvalidServedQueues::Empty);
        }
        if queues.len() > MAX_SERVED_QUEUES {
            return Err(InvalidServedQueues::TooMany(queues.len()));
        }
        for (index, queue) in queues.iter().enumerate() {
            if queues[..index].contains(queue) {
                return Err(InvalidServedQueues::Repeated(queue.to_string()));
            }
        }
        Ok(ServedQueues(queues))
    }

    /// One queue, the default.
    pub fn single(queue: QueueName) -> Self {
        ServedQueues(vec![queue])
    }

    /// The queue used when a request or a trigger names none.
    pub fn default_queue(&self) -> &QueueName {
        &self.0[0]
    }

    /// Every served queue, the default first.
    pub fn iter(&self) -> std::slice::Iter<'_, QueueName> {
        self.0.iter()
    }

    /// Whether `queue` is served.
    pub fn contains(&self, queue: &QueueName) -> bool {
        self.0.contains(queue)
    }

    /// The served queue a request names, or the default when it names none.
    pub fn resolve(&self, name: Option<&str>) -> Result<QueueName, UnservedQueue> {
        let Some(name) = name else {
            return Ok(self.default_queue().clone());
        };
        let queue: QueueName = name.parse()?;
        if self.contains(&queue) {
            Ok(queue)
        } else {
            Err(UnservedQueue::NotServed {
                queue: queue.to_string(),
                served: self.to_string(),
            })
        }
    }
}

impl fmt::Display for ServedQueues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, queue) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            f.write_str(queue.as_str())?;
        }
        Ok(())
    }
}

impl<'a> IntoIterator for &'a ServedQueues {
    type Item = &'a QueueName;
    type IntoIter = std::slice::Iter<'a, QueueName>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<QueueName> {
        list.iter().map(|name| name.parse().unwrap()).collect()
    }

    #[test]
    fn the_first_is_the_default_and_others_are_refused_by_name() {
        let served = ServedQueues::new(names(&["rec", "web"])).unwrap();
        assert_eq!(served.default_queue().as_str(), "rec");
        assert_eq!(served.resolve(None).unwrap().as_str(), "rec");
        assert_eq!(served.resolve(Some("web")).unwrap().as_str(), "web");
        let error = served.resolve(Some("other")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "queue \"other\" is not served here; the served queues are rec, web"
        );
        assert!(matches!(
            served.resolve(Some("no spaces")),
            Err(UnservedQueue::Invalid(_))
        ));
    }

    #[test]
    fn empty_repeated_and_too_many_are_refused() {
        assert_eq!(ServedQueues::new(vec![]), Err(InvalidServedQueues::Empty));
        assert_eq!(
            ServedQueues::new(names(&["a", "b", "a"])),
            Err(InvalidServedQueues::Repeated("a".to_owned()))
        );
        let many: Vec<QueueName> = (0..=MAX_SERVED_QUEUES)
            .map(|i| format!("q{i}").parse().unwrap())
            .collect();
        assert!(matches!(
            ServedQueues::new(many),
            Err(InvalidServedQueues::TooMany(_))
        ));
    }
}
