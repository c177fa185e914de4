// What the Hub's own JavaScript makes of a repo moeq published: run by tests/test_hub_clients.py.
// Input (argv[2], JSON): {"names": [repo paths], "urls": {"path": "resolve URL"}}.
// Output (stdout, JSON): each name's quant label (@huggingface/tasks parseGGUFQuantLabel, as the Hub labels
// files) and shard info, and for each URL the GGUF header @huggingface/gguf reads over HTTP Range.
import { parseGGUFQuantLabel } from "@huggingface/tasks";
import { gguf, parseGgufShardFilename } from "@huggingface/gguf";

const input = JSON.parse(process.argv[2]);
const labels = {};
for (const name of input.names) {
  labels[name] = { label: parseGGUFQuantLabel(name) ?? null, shard: parseGgufShardFilename(name) };
}
const headers = {};
for (const [name, url] of Object.entries(input.urls)) {
  const { metadata, tensorInfos } = await gguf(url);
  headers[name] = {
    architecture: metadata["general.architecture"],
    file_type: metadata["general.file_type"] ?? null,
    tensor_count: Number(metadata.tensor_count),
    tensors: tensorInfos.length,
    split_count: metadata["split.count"] ?? null,
    split_no: metadata["split.no"] ?? null,
  };
}
process.stdout.write(JSON.stringify({ labels, headers }, null, 1) + "\n");
