def parse_line(line):
    if "=" not in line:
        raise ValueError("no '=' in line")
    key, _, value = line.partition("=")
    return key.strip(), value.strip()


def split_pairs(text):
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pairs.append(parse_line(line))
    return pairs
