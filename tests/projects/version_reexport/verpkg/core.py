"""Functions the package re-exports; the repo's tests reach them as `verpkg.encode` through
`import verpkg as v` (as idna's tests do)."""


class CodecError(ValueError):
    pass


def encode(text):
    if not isinstance(text, str):
        raise CodecError("encode takes a str")
    return text.encode("ascii", "strict")


def decode(data):
    if not isinstance(data, bytes):
        raise CodecError("decode takes bytes")
    return data.decode("ascii", "strict")
