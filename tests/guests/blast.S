# blast: guest -> host serial throughput. Reads its parameters from the PVH command line
# (hvm_start_info.cmdline_paddr), `KEY=N` words, decimal or 0x hex, defaults in brackets:
#   divisor=N  COM1 divisor latch [1 = 115200 baud]
#   lcr=N      line control, the frame [3 = 8N1; 0x1e = 7E2]
#   count=N    payload bytes [1024]
#   burst=N    payload bytes written each time THRE is seen set, 1 to 16 [1]: 1 keeps one
#              byte queued behind the shift register; 16 refills the whole FIFO, as Linux does
# Programs COM1 (FIFOs on, no interrupts), prints "BLAST-START\n", writes `count` bytes of 'U'
# polling LSR.THRE before each burst, waits for LSR.TEMT, prints "BLAST-END <count>\n", waits
# for TEMT again and powers off. The markers hold no 'U', so the host counts payload bytes as the
# 'U's between them. resources/bench-serial.py times this on the host.
	.code32
	.include "common.inc"

	.set SI_CMDLINE, 24		# hvm_start_info.cmdline_paddr (u64; the low half is enough)
	.set LSR_TEMT, 0x40

	program_start
	mov start_info, %ebx
	mov SI_CMDLINE(%ebx), %edi
	mov $key_divisor, %esi
	mov $1, %eax
	call getarg
	mov %eax, divisor
	mov $key_lcr, %esi
	mov $LCR_8N1, %eax
	call getarg
	mov %eax, lcr
	mov $key_count, %esi
	mov $1024, %eax
	call getarg
	mov %eax, count
	mov $key_burst, %esi
	mov $1, %eax
	call getarg
	cmp $1, %eax			# clamp to 1..16 (the FIFO's depth)
	jge 1f
	mov $1, %eax
1:	cmp $16, %eax
	jle 2f
	mov $16, %eax
2:	mov %eax, burst

	call uart_setup
	mov $msg_start, %esi
	call puts
	mov count, %ecx			# bytes left
	test %ecx, %ecx
	jz 4f
	mov $'U', %al
1:	call putc			# polls THRE, then writes
	dec %ecx
	jz 4f
	mov burst, %edi			# the rest of this burst goes straight in
	mov $COM1 + UART_THR, %dx
2:	dec %edi
	jz 1b
	out %al, %dx
	dec %ecx
	jnz 2b
4:	call wait_temt
	mov $msg_end, %esi
	call puts
	mov count, %eax
	call putdec
	mov $'\n', %al
	call putc
	call wait_temt
	jmp poweroff

	.include "line.inc"

	.section .rodata
key_divisor:
	.asciz "divisor="
key_lcr:
	.asciz "lcr="
key_count:
	.asciz "count="
key_burst:
	.asciz "burst="
msg_start:
	.asciz "BLAST-START\n"
msg_end:
	.asciz "BLAST-END "
	.data
	.balign 4
divisor:
	.long 0
lcr:
	.long 0
count:
	.long 0
burst:
	.long 0
	.text
