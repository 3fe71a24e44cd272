"""Alert consumers for people: ``meterstream alerts tail`` and ``meterstream alerts forward``.

- :mod:`.source`    reading ``budget-alerts`` (read_committed, validated with ``BudgetAlert``)
- :mod:`.tail`      following the topic and formatting an alert for people
- :mod:`.webhook`   the POST of one alert: body, HMAC signature, retry rule (pure parts unit-tested)
- :mod:`.ledger`    the durable record of delivered alert ids (SQLite)
- :mod:`.forwarder` the loop that ties them together, and its delivery guarantee
"""
