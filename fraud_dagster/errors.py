"""The project's exception family: each error says what was wrong and what to do."""


class FraudDagsterError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigurationError(FraudDagsterError):
    """A setting is missing or contradicts another one."""


# The words of every error about a topic the broker does not have (`kafka_io`): the operators'
# email about an unreadable topic tells that case apart from a broker that does not answer.
MISSING_TOPIC_WORDS = "does not exist on the broker"


class KafkaUnavailableError(FraudDagsterError):
    """The broker could not be reached or did not answer in time."""


class TopicChangedError(FraudDagsterError):
    """The topic a batch was planned for was deleted: the broker's topic of that name is another
    one (another topic id), whose offsets hold other messages."""


class OffsetRangeError(FraudDagsterError):
    """An offset range cannot be read as asked: it is not written yet, or retention deleted
    part of it while it was read (a retry then records those offsets as lost)."""


class ModelIntegrityError(FraudDagsterError):
    """A model file is missing, unreadable or does not match its recorded SHA-256."""


class LabelError(FraudDagsterError):
    """A label refers to a transaction the system never scored, or its source is unusable."""


class StorageError(FraudDagsterError):
    """The application database refused or could not complete a write."""


class AlertDeliveryError(FraudDagsterError):
    """An alert email could not be handed to the SMTP server."""


class LocalServiceError(FraudDagsterError):
    """A local development service (Kafka, SMTP, PostgreSQL) could not be started or stopped."""
