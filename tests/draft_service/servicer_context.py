"""What a DraftServicer driven without a server needs of its gRPC context."""


class StreamContext:
    """The one context call Speculate makes on a stream that goes well: its headers at once."""

    async def send_initial_metadata(self, metadata) -> None:
        pass
