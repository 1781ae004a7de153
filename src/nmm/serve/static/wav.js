// Audio for the playground: any file or recording the browser can decode -> a 16-bit mono WAV, the
// format the server reads for sure (browsers record webm/ogg-opus, which libsndfile may not read).
"use strict";

// base64 of an ArrayBuffer, in slices so that String.fromCharCode never gets too many arguments.
function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

// An AudioBuffer -> WAV bytes: channels mixed down to mono, 16-bit PCM at the buffer's own rate (the
// server resamples to the model's 16 kHz, better than a browser would).
function encodeWav(audio) {
  const n = audio.length, rate = audio.sampleRate;
  const mono = new Float32Array(n);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const data = audio.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += data[i] / audio.numberOfChannels;
  }
  const out = new DataView(new ArrayBuffer(44 + 2 * n));
  const ascii = (at, s) => [...s].forEach((ch, i) => out.setUint8(at + i, ch.charCodeAt(0)));
  ascii(0, "RIFF"); out.setUint32(4, 36 + 2 * n, true); ascii(8, "WAVE");
  ascii(12, "fmt "); out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, rate, true); out.setUint32(28, 2 * rate, true); out.setUint16(32, 2, true);
  out.setUint16(34, 16, true);
  ascii(36, "data"); out.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) out.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, mono[i])) * 0x7fff, true);
  return out.buffer;
}

// A Blob (file or recording) -> {data: base64, format} for an input_audio part. WAV, MP3, FLAC and OGG
// files go as they are; anything else is decoded by the browser and sent as WAV.
async function audioPart(blob, name = "") {
  const ext = (name.match(/\.(\w+)$/) || [])[1]?.toLowerCase();
  const byType = { "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mpeg": "mp3",
                   "audio/flac": "flac", "audio/x-flac": "flac" };
  const format = byType[blob.type] || (["wav", "mp3", "flac"].includes(ext) ? ext : null);
  const bytes = await blob.arrayBuffer();
  if (format) return { data: toBase64(bytes), format };
  const context = new (window.AudioContext || window.webkitAudioContext)();
  try {
    return { data: toBase64(encodeWav(await context.decodeAudioData(bytes))), format: "wav" };
  } finally {
    context.close();
  }
}
