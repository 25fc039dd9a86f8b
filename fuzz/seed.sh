#!/usr/bin/env bash
# Seed corpora for the fuzz targets (see the README, "Fuzzing").
#
#   fuzz/seed.sh        # from anywhere; needs the `ffmpeg` CLI
#
# probe_media: tiny (64x48, 0.2 s) clips in the containers and codecs uploads come in, a
# rotated one, an audio-only file (a refusal path) and a few non-media bytes.
# parse_message: valid and invalid job bodies for both job types.
# Everything generated here is git-ignored; re-running overwrites the seeds and leaves
# whatever the fuzzer added to the corpora alone.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
media="$here/corpus/probe_media"
msgs="$here/corpus/parse_message"
mkdir -p "$media" "$msgs"

ff() { ffmpeg -hide_banner -loglevel error -nostdin -y "$@"; }
video=(-f lavfi -i "testsrc2=size=64x48:rate=10:duration=0.2")
audio=(-f lavfi -i "sine=frequency=440:sample_rate=8000:duration=0.2")
small=(-g 2 -pix_fmt yuv420p)

ff "${video[@]}" "${audio[@]}" -c:v libx264 -preset ultrafast "${small[@]}" -c:a aac -b:a 16k -shortest "$media/seed-h264-aac.mp4"
ff "${video[@]}" -c:v libx264 -preset ultrafast "${small[@]}" -bf 2 -movflags +faststart "$media/seed-h264-bframes-faststart.mp4"
# A display matrix is only written on a stream copy with FFmpeg 5.
ff -i "$media/seed-h264-bframes-faststart.mp4" -c copy -metadata:s:v:0 rotate=90 "$media/seed-h264-rotated.mov"
ff "${video[@]}" "${audio[@]}" -c:v libvpx-vp9 -deadline realtime -cpu-used 8 "${small[@]}" -c:a libopus -b:a 16k -shortest "$media/seed-vp9-opus.webm"
ff "${video[@]}" -c:v libvpx -deadline realtime -cpu-used 8 "${small[@]}" "$media/seed-vp8.webm"
ff "${video[@]}" "${audio[@]}" -c:v mpeg2video "${small[@]}" -c:a mp2 -b:a 32k -shortest "$media/seed-mpeg2.ts"
ff "${video[@]}" -c:v libx265 -preset ultrafast -x265-params log-level=none "${small[@]}" "$media/seed-hevc.mkv"
ff "${video[@]}" -c:v mpeg4 "${small[@]}" "$media/seed-mpeg4.avi"
ff "${video[@]}" -c:v mjpeg -pix_fmt yuvj420p "$media/seed-mjpeg.avi"
ff "${video[@]}" -c:v libaom-av1 -cpu-used 8 -usage realtime "${small[@]}" "$media/seed-av1.mp4"
ff "${video[@]}" -vf "fps=5" "$media/seed-anim.gif"
ff "${audio[@]}" -c:a libmp3lame -b:a 16k "$media/seed-audio.mp3"
ff "${audio[@]}" -c:a aac -b:a 16k "$media/seed-audio.m4a"
printf 'not a video\n' >"$media/seed-text"
head -c 256 /dev/zero >"$media/seed-zeros"

# --- job messages -----------------------------------------------------------------------
id='"job_id":"6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e"'
keys='"source":"uploads/6f1c/source","output_prefix":"outputs/6f1c/out/"'
msg() { printf '%s\n' "$2" >"$msgs/seed-$1.json"; }

msg transcode-minimal "{\"schema\":1,\"task\":\"transcode\",$id,$keys}"
msg transcode-full "{\"schema\":1,\"task\":\"transcode\",$id,$keys,\"renditions\":[{\"name\":\"720p\",\"height\":720,\"video_kbps\":3000,\"audio_kbps\":128},{\"name\":\"360p\",\"height\":360,\"video_kbps\":800,\"audio_kbps\":64}],\"formats\":[\"mp4\",\"hls\"]}"
msg thumbnail-minimal "{\"schema\":1,\"task\":\"thumbnail\",$id,$keys}"
msg thumbnail-full "{\"schema\":1,\"task\":\"thumbnail\",$id,$keys,\"poster\":false,\"count\":3,\"timestamps\":[0,1.5,1e-3,12.25],\"width\":160,\"format\":\"webp\",\"quality\":70,\"sprite\":{\"interval_s\":2,\"columns\":10,\"width\":160,\"keyframes_only\":true}}"
msg bad-traversal "{\"schema\":1,\"task\":\"transcode\",$id,\"source\":\"uploads/../../etc/passwd\",\"output_prefix\":\"outputs/x/\"}"
msg bad-absolute "{\"schema\":1,\"task\":\"thumbnail\",$id,\"source\":\"/etc/passwd\",\"output_prefix\":\"outputs/x/\"}"
msg bad-prefix "{\"schema\":1,\"task\":\"transcode\",$id,\"source\":\"uploads/x/source\",\"output_prefix\":\"outputs/x\"}"
msg bad-schema "{\"schema\":2,\"task\":\"transcode\",$id,$keys}"
msg bad-range "{\"schema\":1,\"task\":\"thumbnail\",$id,$keys,\"width\":8,\"timestamps\":[-1],\"sprite\":{\"interval_s\":0.01,\"columns\":0,\"width\":9999}}"
msg bad-unknown-field "{\"schema\":1,\"task\":\"transcode\",$id,$keys,\"renditions\":[{\"name\":\"x\",\"height\":720,\"video_kbps\":3000,\"audio_kbps\":128,\"crf\":1}]}"
msg bad-json '{"schema":1,"task":"transcode",'

echo "seeded $(ls "$media" | wc -l) media files in $media and $(ls "$msgs"/seed-* | wc -l) messages in $msgs"
