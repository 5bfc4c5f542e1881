"""Names of the RabbitMQ exchanges and queues, in one place."""

REGENERATE_QUEUE = "clipchat.regenerate"
COMPOSE_QUEUE = "clipchat.compose"
WORK_QUEUES = (REGENERATE_QUEUE, COMPOSE_QUEUE)
EVENTS_EXCHANGE = "clipchat.events"
DEAD_LETTER_EXCHANGE = "clipchat.dlx"
DEAD_LETTER_QUEUE = "clipchat.dead-letter"
